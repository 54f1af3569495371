"""A real browser joins the dev server: headless Chromium + the official livekit-client.

The page (`appliance/dev/server/web/viewer.html`, livekit-client at its default
options) is served from a different origin than the dev server, as a kiosk screen
page, LiveKit Meet or the agents playground would be: the SDK's probe of
`/rtc/v1/validate` and its fallback to `/rtc` only work with CORS.  Chromium
(Debian's, driven by playwright-core from npm) runs as a child of this process,
so inside the test's private network namespace.  While an agent speaks to the
kiosk (tone bursts), the page records every frame it shows (size, how open the
mouth is) and the level of the audio it plays; the test checks frame rate,
resolution, audio, and the offset between mouth and audio onsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from appliance.dev.bench import KioskProcess, write_kiosk_config
from appliance.dev.demo import AgentVoice, make_token
from appliance.dev.server.viewer import WEB_DIR, ViewerRoutes
from appliance.runtimes.reference import mouth_box_for
from appliance.supervisor import bundled_model

KIOSK = "kiosk-browser"
ROOM = "lobby"
CHROMIUM = "/usr/bin/chromium"
DRIVER = Path(__file__).with_name("browser_driver.cjs")
NODE_MODULES = WEB_DIR / "node_modules"
SCREENSHOT_DIR = Path(os.environ.get("BROWSER_SCREENSHOTS", "/tmp"))

TONE_RATE = 24000
BURSTS = 8
BURST_S, GAP_S = 0.3, 0.7
AV_BOUND_MS = 150  # what the kiosk and the relay may add (ms)


def _need_browser() -> str:
    """The node binary; skip when Chromium or node is not on this machine at all."""
    node = shutil.which("node")
    if not os.access(CHROMIUM, os.X_OK) or node is None:
        pytest.skip(f"needs Debian's chromium ({CHROMIUM}) and node: `make setup` installs both")
    # installed tools but no npm packages is a broken setup, not a reason to skip
    for package in ("playwright-core", "livekit-client"):
        assert (NODE_MODULES / package).is_dir(), (
            f"{NODE_MODULES / package} is missing: run `make setup` (npm ci in {WEB_DIR})"
        )
    return node


class Browser:
    """tests/dev/browser_driver.cjs as a child process: one JSON line per command."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr

    @classmethod
    async def start(cls, node: str, tmp: Path) -> Browser:
        profile = tmp / "chromium-profile"
        profile.mkdir()
        stderr = tmp / "browser.log"
        proc = await asyncio.create_subprocess_exec(
            node, str(DRIVER), str(profile),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=stderr.open("wb"), env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
            limit=64 * 1024 * 1024,  # the collected measurements come back as one line
        )
        return cls(proc, stderr)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    async def call(self, timeout_s: float, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        assert line, f"the browser driver exited:\n{self.log()[-3000:]}"
        return json.loads(line)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.call(10, cmd="quit")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 10)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class _NoTokens:
    api_key: str = ""
    api_secret: str = ""
    viewer_room: str | None = None


@pytest.fixture
async def page_origin(media_host: str) -> AsyncIterator[str]:
    """The viewer page served from its own origin (another port), without tokens."""
    app = web.Application()
    ViewerRoutes(_NoTokens()).add_to(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, media_host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://{media_host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def kiosk(devserver, tmp_path: Path) -> AsyncIterator[KioskProcess]:  # type: ignore[no-untyped-def]
    config = write_kiosk_config(
        tmp_path, url=devserver.url, api_key=devserver.api_key,
        api_secret=devserver.api_secret, room=ROOM, identity=KIOSK,
    )
    process = KioskProcess(config, tmp_path / "kiosk.log")
    process.start()
    try:
        await process.async_wait_for(
            lambda s: s["room"]["state"] == "live" and s["fps_10s"] > 0, 60, "went live"
        )
        yield process
    finally:
        await asyncio.to_thread(process.stop)


def tone_bursts() -> np.ndarray:
    """BURSTS bursts of a voiced-sounding tone (BURST_S on, GAP_S off), int16 at TONE_RATE."""
    t = np.arange(int(BURST_S * TONE_RATE)) / TONE_RATE
    tone = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((180, 360, 720, 1440), 1))
    ramp = np.minimum(1.0, np.arange(len(t)) / (0.005 * TONE_RATE))  # 5 ms fade-in
    burst = (0.25 * 32767 * tone / np.max(np.abs(tone)) * ramp * ramp[::-1]).astype(np.int16)
    gap = np.zeros(int(GAP_S * TONE_RATE), np.int16)
    return np.concatenate([np.concatenate([burst, gap]) for _ in range(BURSTS)])


def onsets(times: np.ndarray, values: np.ndarray, threshold: float, quiet_s: float = 0.3) -> list[float]:
    """Times where `values` rises above `threshold` after at least `quiet_s` below it."""
    found: list[float] = []
    last_loud = -np.inf
    for t, v in zip(times, values, strict=True):
        if v >= threshold:
            if t - last_loud >= quiet_s:
                found.append(float(t))
            last_loud = t
    return found


def av_offsets_ms(frames: np.ndarray, audio: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """(mouth onset - audio onset in ms per burst, audio onsets, mouth onsets); > 0: video late.

    Onsets are paired in order, so a lag near half the burst period is not misread."""
    mouth_t, mouth = frames[:, 0], frames[:, 3]
    audio_t, level = audio[:, 0], audio[:, 1]
    audio_on = onsets(audio_t, level, 0.3 * float(level.max()))
    mouth_on = onsets(mouth_t, mouth, 0.4 * float(mouth.max()))
    if len(audio_on) != len(mouth_on):
        return [], audio_on, mouth_on
    return [1000.0 * (m - a) for a, m in zip(audio_on, mouth_on, strict=True)], audio_on, mouth_on


async def test_browser_sees_and_hears_the_avatar(  # type: ignore[no-untyped-def]
    devserver, kiosk: KioskProcess, page_origin: str, tmp_path: Path
) -> None:
    node = _need_browser()
    box = mouth_box_for(bundled_model(), 512, 512)
    query = urllib.parse.urlencode({
        "url": devserver.url,
        "token": make_token(devserver.api_key, devserver.api_secret, ROOM, "browser"),
        "identity": KIOSK,
        "mouth": ",".join(map(str, box)),
    })
    browser = await Browser.start(node, tmp_path)
    try:
        opened_at = time.monotonic()
        opened = await browser.call(60, cmd="open", url=f"{page_origin}/viewer/?{query}", timeout_ms=30000)
        assert opened["ok"], f"the page did not play: {opened}\n{browser.log()[-3000:]}"
        print(f"\nbrowser: first frame {time.monotonic() - opened_at:.1f} s after opening the page")
        await asyncio.sleep(2.0)

        voice = AgentVoice(KIOSK)
        await voice.connect(devserver.url, make_token(devserver.api_key, devserver.api_secret, ROOM, "agent", agent=True))
        await kiosk.async_wait_for(lambda s: s["agent"] == "agent", 10, "saw the agent")
        agent_joined = time.time()
        pcm = tone_bursts()
        await voice.say(pcm, TONE_RATE)
        await asyncio.wait_for(voice.finished_event.wait(), len(pcm) / TONE_RATE + 10)
        speech_end = time.time()
        await asyncio.sleep(1.0)
        shot = SCREENSHOT_DIR / "test_browser.png"
        collected = await browser.call(30, cmd="collect", screenshot=str(shot))
        await voice.close()
        assert collected["ok"], collected
        page = collected["viewer"]
        (tmp_path / "page.json").write_text(json.dumps(page))
        if os.environ.get("BROWSER_KEEP"):
            shutil.copy(tmp_path / "page.json", os.environ["BROWSER_KEEP"])

        # page times (performance.now, ms) -> wall clock (s)
        def wall(ms: float) -> float:
            return (page["timeOrigin"] + ms) / 1000.0

        frames = np.array([[wall(f[0]), f[1], f[2], f[3]] for f in page["frames"]], dtype=float)
        audio = np.array([[wall(a[0]), a[1]] for a in page["audio"]], dtype=float)
        assert len(frames) and len(audio), f"no frames or no audio in the page: {page['error']}"
        # while the agent speaks: from its join until its speech ended
        speaking = frames[(frames[:, 0] >= agent_joined) & (frames[:, 0] <= speech_end)]
        span = speech_end - agent_joined
        fps = len(speaking) / span
        sizes = sorted({(int(w), int(h)) for _, w, h, _ in speaking})
        stats = [s for s in page["stats"]
                 if agent_joined <= wall(s["at"]) <= speech_end and "audio" in s and "video" in s]
        neteq_ms = _jitter_buffer_ms(stats)
        video_buffer_ms = _jitter_buffer_ms(stats, "video")
        decoded_fps = _decoded_fps(stats)
        heard = audio[(audio[:, 0] >= agent_joined) & (audio[:, 0] <= speech_end + 1.0)]
        offsets, audio_on, mouth_on = av_offsets_ms(frames[frames[:, 0] >= agent_joined], heard)
        print(f"browser while the agent spoke ({span:.1f} s): {decoded_fps:.1f} fps decoded, "
              f"{fps:.1f} shown, sizes {sizes}, "
              f"audio peak rms {heard[:, 1].max():.3f}, jitter buffer {neteq_ms:.0f} ms (video {video_buffer_ms:.0f} ms), "
              f"audio output latency {page['audioLatencyMs']:.0f} ms")
        print(f"browser A/V offset (mouth onset - audio onset) per burst, ms: "
              f"{[round(o) for o in offsets]}; median {np.median(offsets) if offsets else float('nan'):.0f}")
        print(f"screenshot: {shot}")

        # 25 fps sent: 23-25 decoded on a quiet 2-core machine, 19.5 (13.9 shown) measured on a
        # loaded CI host, where the dev server's Python re-encode falls behind. The printed
        # numbers are the measurement; these bounds catch a path that loses most of its frames
        # (a headless page on a busy machine also skips repaints: shown < decoded).
        assert decoded_fps >= 15, f"only {decoded_fps:.1f} fps decoded while the agent spoke"
        assert fps >= 10, f"only {fps:.1f} fps shown while the agent spoke"
        assert sizes == [(512, 512)], f"the video was not 512x512 throughout: {sizes}"
        assert heard[:, 1].max() > 0.05, "no audio was heard in the browser"
        assert len(offsets) == BURSTS, (
            f"{BURSTS} bursts spoken, but {len(audio_on)} audio and {len(mouth_on)} mouth onsets seen"
        )
        # What a person sees: median 115-290 ms audio-late here (470-550 before the relay fixes).
        # Most of it is the browser's: it holds audio in its jitter buffer (80-280 ms) longer than
        # video (20-110 ms) and does not delay the picture to match behind this relay, and the
        # offset follows that difference run by run. What the kiosk and the relay add is the rest.
        median = float(np.median(offsets))
        kiosk_and_relay = median + (neteq_ms - video_buffer_ms)
        print(f"A/V offset less the browser's jitter-buffer difference ({neteq_ms - video_buffer_ms:.0f} ms): "
              f"{kiosk_and_relay:.0f} ms")
        assert abs(kiosk_and_relay) <= AV_BOUND_MS, (
            f"A/V offset {median:.0f} ms, {kiosk_and_relay:.0f} ms without the browser's jitter buffers"
        )

        # `make run`'s viewer: the dev server's own page, with a token it mints itself
        devserver.viewer_room = ROOM
        opened = await browser.call(60, cmd="open", url=devserver.viewer_url, timeout_ms=30000)
        assert opened["ok"], f"the dev server's viewer did not play: {opened}\n{browser.log()[-3000:]}"
    finally:
        await browser.close()


def _decoded_fps(stats: list[dict[str, Any]]) -> float:
    """Video frames decoded per second over the window, from inbound-rtp stats."""
    if len(stats) < 2:
        return float("nan")
    first, last = stats[0], stats[-1]
    frames = last["video"]["framesDecoded"] - first["video"]["framesDecoded"]
    return 1000.0 * frames / (last["at"] - first["at"])


def _jitter_buffer_ms(stats: list[dict[str, Any]], kind: str = "audio") -> float:
    """A track's mean jitter-buffer delay over the window, from inbound-rtp stats (for video
    it includes what the browser adds to keep it in sync with the audio)."""
    if len(stats) < 2:
        return float("nan")
    first, last = stats[0][kind], stats[-1][kind]
    emitted = last["jitterBufferEmittedCount"] - first["jitterBufferEmittedCount"]
    delay = last["jitterBufferDelay"] - first["jitterBufferDelay"]
    return 1000.0 * delay / emitted if emitted else float("nan")


async def test_cors_and_the_v1_fallback_answers(signal_host: str, make_token) -> None:  # type: ignore[no-untyped-def]
    """What a page on another origin needs from the dev server, as from livekit-server."""
    import aiohttp
    from conftest import DEV_API_KEY, DEV_API_SECRET

    from appliance.dev.server import DevServer, auth

    server = DevServer(signal_host, 0, DEV_API_KEY, DEV_API_SECRET, viewer_room=ROOM)
    await server.start()
    base, origin = server.viewer_url.removesuffix("/viewer/"), "http://page.example:8080"
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/rtc", "/rtc/validate", "/rtc/v1", "/rtc/v1/validate", "/viewer/token", "/nowhere"):
                preflight = {"Origin": origin, "Access-Control-Request-Method": "GET",
                             "Access-Control-Request-Headers": "authorization"}
                async with http.options(base + path, headers=preflight) as resp:
                    assert resp.status == 204, (path, resp.status)
                    assert resp.headers["Access-Control-Allow-Origin"] == origin
                    assert resp.headers["Access-Control-Allow-Methods"] == "GET"
                    assert resp.headers["Access-Control-Allow-Headers"] == "authorization"
            # livekit-client reads this 404 (it may, thanks to CORS) and falls back to /rtc
            async with http.get(f"{base}/rtc/v1/validate", headers={"Origin": origin}) as resp:
                assert resp.status == 404
                assert resp.headers["Access-Control-Allow-Origin"] == origin
                assert "requested room does not exist" not in await resp.text()
            token = make_token("someone")
            async with http.get(f"{base}/rtc/validate?access_token={token}", headers={"Origin": origin}) as resp:
                assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == origin
            async with http.get(f"{base}/rtc/validate", headers={"Origin": origin}) as resp:
                assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == origin
            # the viewer's token: watch this room, nothing else
            async with http.get(f"{base}/viewer/token") as resp:
                assert resp.status == 200
                grant = auth.verify((await resp.json())["token"], DEV_API_KEY, DEV_API_SECRET)
            assert grant.room == ROOM and grant.identity.startswith("viewer-")
            assert grant.can_subscribe and not grant.can_publish and not grant.can_publish_data
            async with http.get(server.viewer_url) as resp:
                assert resp.status == 200 and "livekit-client.umd.js" in await resp.text()
            async with http.get(f"{base}/viewer/package.json") as resp:
                assert resp.status == 404  # only the page's own files are served
    finally:
        await server.stop()
