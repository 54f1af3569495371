"""Benchmark: ``python -m appliance.dev.bench`` (``make bench``) prints numbers, asserts nothing.

It runs the real thing, end to end: the dev server, the kiosk daemon as its
own process (supervisor + renderer child), and a subscriber that measures
what a viewer of the room sees. For ``--seconds`` (default 60) it reports:

- fps at the subscriber, p50/p99/max frame interval;
- CPU seconds per second of the supervisor process (publishing, encoding,
  protocol: everything except rendering), of the renderer child and of the
  audio child (speaker, microphone with echo cancellation, the visitor
  participant publishing it; both devices are ALSA ``file`` PCMs here), and
  the echo canceller's cost per 10 ms frame;
- peak RSS of all three;
- then it SIGKILLs the renderer and reports the gap in frames the subscriber saw;
- the local screen (``--display offscreen`` (default) or ``x11``: on an Xvfb of its own;
  ``none``: skipped): frames presented per second, frame-to-screen latency (frame handed to
  the screen sink → ``SDL_RenderPresent`` returned; p50 and max) and the screen child's CPU;
  ``--screen-only`` measures just that, without a room (no namespace, no root needed);
- barge-in: ``clear_to_silence_ms`` (p50 and max over ``--interrupts``), from an
  agent's ``clear_buffer()`` to the avatar's voice falling silent at the
  subscriber (see ``bench_bargein.py``), on a quiet machine and with two
  CPU-burning processes beside the kiosk, for the kiosk and for a stand-in
  built on the stock LiveKit Agents ``AvatarRunner`` in the same room setup.

The dev server runs as its own process, as a LiveKit server would, so its
relaying does not hold up the subscriber's clock.

WebRTC ignores loopback and we send traffic nowhere else, so (as root) the
benchmark moves itself into a private network namespace with a veth pair,
which it removes at the end; without root it says so and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from appliance.dev.bench_bargein import measure, summary
from appliance.dev.demo import AgentVoice, Viewer, make_token
from appliance.status.server import query_status

__all__ = ["KioskProcess", "dev_server_process", "write_kiosk_config", "main"]


def write_kiosk_config(
    directory: Path, *, url: str, api_key: str, api_secret: str, room: str = "lobby",
    identity: str = "kiosk", extra: str = "",
) -> Path:
    secret = directory / "livekit.secret"
    secret.write_text(api_secret)
    secret.chmod(0o600)
    path = directory / "appliance.toml"
    path.write_text(
        f'[livekit]\nurl = "{url}"\nroom = "{room}"\nidentity = "{identity}"\n'
        f'api_key = "{api_key}"\napi_secret_file = "{secret}"\n'
        f'[status]\nsocket = "{directory / "status.sock"}"\n{extra}'
    )
    return path


class KioskProcess:
    """`appliance run` as a child process, the way systemd runs it."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log
        self.env = env
        self.socket = str(config.parent / "status.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "run", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})},
            )

    def status(self) -> dict[str, Any]:
        return query_status(self.socket)

    async def async_wait_for(self, predicate: Any, timeout_s: float, what: str) -> dict[str, Any]:
        """Same as wait_for, without blocking the event loop (SDK callbacks keep running)."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                last = self.status()
                if predicate(last):
                    return last
            await asyncio.sleep(0.1)
        raise TimeoutError(f"kiosk never {what}; last status {last}\n{self.log()[-3000:]}")

    def renderer_pid(self) -> int:
        pid = self.status()["renderer"]["pid"]
        assert isinstance(pid, int)
        return pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


@dataclass
class CpuSample:
    supervisor_s: float
    renderer_s: float
    at: float


class Display:
    """Where the kiosk's screen child draws: SDL's offscreen driver, or an Xvfb of our own."""

    def __init__(self, driver: str) -> None:
        self.driver, self.env, self._xvfb = driver, {"SDL_VIDEODRIVER": driver}, None
        if driver == "x11":
            read, write = os.pipe()
            self._xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0",
                                           "1920x1080x24", "-nolisten", "tcp"],
                                          pass_fds=(write,), stderr=subprocess.DEVNULL)
            os.close(write)
            with os.fdopen(read) as f:
                self.env["DISPLAY"] = ":" + f.readline().strip()

    def close(self) -> None:
        if self._xvfb is not None:
            _stop([self._xvfb])


async def screen_numbers(kiosk: KioskProcess, seconds: float) -> dict[str, float]:
    """The screen's fps, frame-to-screen latency and its child's CPU, over ``seconds``."""
    status = await kiosk.async_wait_for(
        lambda s: (s.get("display") or {}).get("state") == "showing"
        and (s["display"].get("latency_ms") or {}).get("p50") is not None, 60, "showed the avatar on the screen")
    pid = status["display"]["pid"]
    cpu0, t0 = _cpu(pid), time.monotonic()
    fps, p50, worst = [], [], 0.0
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(1.0)
        display = kiosk.status()["display"]
        latency = display.get("latency_ms") or {}
        fps.append(display["fps"])
        if latency:
            p50.append(latency["p50"])
            worst = max(worst, latency["max"])
    return {
        "screen_fps": float(np.mean(fps)),
        "screen_latency_p50_ms": float(np.median(p50)) if p50 else float("nan"),
        "screen_latency_max_ms": worst,
        "screen_child_cpu_s_per_s": (_cpu(pid) - cpu0) / (time.monotonic() - t0),
        "screen_child_rss_mb": _rss_mb(pid),
    }


def _cpu(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    return 0.0


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    return 0.0


# no sound card: the speaker and the microphone are ALSA file PCMs (as in tests/devices)
BENCH_ASOUNDRC = """\
pcm.default {{ type null }}
pcm.bench_speaker {{ type file slave.pcm {{ type null }} file "{dir}/speaker.raw" format "raw" }}
pcm.bench_mic {{ type file slave.pcm {{ type null }} file "/dev/null" infile "{dir}/mic.raw" format "raw" }}
"""


def _audio_devices(workdir: Path, seconds: float) -> dict[str, str]:
    """An ALSA config for the audio child and the environment that selects it."""
    noise = np.random.default_rng(1).standard_normal(int((seconds + 60) * 16000)) * 100
    (workdir / "mic.raw").write_bytes(noise.astype(np.int16).tobytes())
    asoundrc = workdir / "asoundrc"
    asoundrc.write_text(BENCH_ASOUNDRC.format(dir=workdir))
    return {"ALSA_CONFIG_PATH": str(asoundrc), "JACK_NO_START_SERVER": "1"}


def _aec(status: dict[str, Any]) -> tuple[float, int]:
    aec = (status.get("audio") or {}).get("echo_canceller") or {}
    return float(aec.get("cost_s") or 0.0), int(aec.get("far_frames", 0)) + int(aec.get("near_frames", 0))


async def bench(url: str, api_key: str, api_secret: str, seconds: float, workdir: Path,
                interrupts: int = 12, baseline: bool = True, display: str = "offscreen") -> dict[str, float]:
    extra = '[audio]\nspeaker = "bench_speaker"\nmicrophone = "bench_mic"\n'
    if display == "none":
        extra += "[display]\nenabled = false\n"
    config = write_kiosk_config(workdir, url=url, api_key=api_key, api_secret=api_secret, extra=extra)
    screen = Display(display) if display != "none" else None
    env = {**_audio_devices(workdir, seconds), **(screen.env if screen else {})}
    kiosk = KioskProcess(config, workdir / "kiosk.log", env=env)
    kiosk.start()
    try:
        await kiosk.async_wait_for(lambda s: s["room"]["state"] == "live", 60, "went live")
        viewer = Viewer("kiosk", keep_images=False)
        await viewer.connect(url, make_token(api_key, api_secret, "lobby", "bench-viewer"))
        await asyncio.wait_for(viewer.video_started.wait(), 30)
        await asyncio.sleep(3.0)  # let the encoder and the jitter buffers settle
        assert kiosk.proc is not None
        sup_pid, ren_pid = kiosk.proc.pid, kiosk.renderer_pid()
        status = await kiosk.async_wait_for(lambda s: (s["audio"] or {}).get("pid"), 30, "ran the audio child")
        audio_pid = int(status["audio"]["pid"])
        start = CpuSample(_cpu(sup_pid), _cpu(ren_pid), time.monotonic())
        audio_cpu0, (aec_s0, aec_n0) = _cpu(audio_pid), _aec(status)
        t0 = time.monotonic()
        peak_sup = peak_ren = peak_audio = 0.0
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(1.0)
            peak_sup, peak_ren = max(peak_sup, _rss_mb(sup_pid)), max(peak_ren, _rss_mb(ren_pid))
            peak_audio = max(peak_audio, _rss_mb(audio_pid))
        end = CpuSample(_cpu(sup_pid), _cpu(ren_pid), time.monotonic())
        audio_cpu1, (aec_s1, aec_n1) = _cpu(audio_pid), _aec(kiosk.status())
        intervals = viewer.intervals_ms(since=t0)
        window = end.at - start.at
        frames_in_window = len([t for t in viewer.frame_times if t0 <= t <= end.at])

        # a renderer crash: how long does the room go without a new frame?
        killed_at = time.monotonic()
        os.kill(ren_pid, signal.SIGKILL)
        await kiosk.async_wait_for(lambda s: s["renderer"]["restarts"] >= 1 and s["renderer"]["state"] == "running",
                                   30, "restarted the renderer")
        await asyncio.sleep(2.0)
        gap_ms = viewer.max_interval_ms(since=killed_at - 1.0)
        results = {
            "seconds": window,
            "fps_subscriber": frames_in_window / window,
            "interval_p50_ms": float(np.percentile(intervals, 50)),
            "interval_p99_ms": float(np.percentile(intervals, 99)),
            "interval_max_ms": float(np.max(intervals)),
            "supervisor_cpu_s_per_s": (end.supervisor_s - start.supervisor_s) / window,
            "renderer_cpu_s_per_s": (end.renderer_s - start.renderer_s) / window,
            "audio_child_cpu_s_per_s": (audio_cpu1 - audio_cpu0) / window,
            # both directions: process_reverse_stream (speaker) and process_stream (microphone)
            "aec_ms_per_10ms_frame": 1000 * (aec_s1 - aec_s0) / max(1, aec_n1 - aec_n0),
            "supervisor_peak_rss_mb": peak_sup,
            "renderer_peak_rss_mb": peak_ren,
            "audio_child_peak_rss_mb": peak_audio,
            "gap_after_renderer_sigkill_ms": gap_ms,
        }
        if screen is not None:
            results.update(await screen_numbers(kiosk, min(seconds, 20.0)))
        voice = AgentVoice("kiosk")
        await voice.connect(url, make_token(api_key, api_secret, "lobby", "bench-agent", agent=True))
        await kiosk.async_wait_for(lambda s: s["agent"] == "bench-agent", 20, "saw the agent")
        results.update(await _barge_in("kiosk", voice, viewer, interrupts))
        await voice.close()
        await viewer.close()
    finally:
        kiosk.stop()
        if screen is not None:
            screen.close()
    if baseline:
        try:
            results.update(await _baseline(url, api_key, api_secret, interrupts))
        except Exception as exc:  # the kiosk's figures still count
            print(f"bench: the AvatarRunner baseline failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return results


async def _barge_in(who: str, voice: AgentVoice, viewer: Viewer, interrupts: int) -> dict[str, float]:
    """clear_to_silence_ms on a quiet machine, then with two CPU burners beside the avatar."""
    out: dict[str, float] = {}
    for load in ("quiet", "loaded"):
        burners = _start_burners(2 if load == "loaded" else 0)
        try:
            await asyncio.sleep(3.0 if burners else 0.5)
            before = await viewer.audio_receive_stats()
            measured = await measure(voice, viewer, interrupts)
            jitter_ms, concealed_pct = (await viewer.audio_receive_stats()).since(before)
        finally:
            _stop(burners)
        found = summary(measured)
        values = " ".join(f"{r.clear_to_silence_ms:.0f}" for r in measured)
        print(f"bench: {who} {load}: clear_to_silence_ms {values}", file=sys.stderr, flush=True)
        out[f"{who}_{load}_clear_to_silence_p50_ms"] = found["p50_ms"]
        out[f"{who}_{load}_clear_to_silence_max_ms"] = found["max_ms"]
        out[f"{who}_{load}_interrupts_not_reported"] = found["not_reported"]
        # how much of that the subscriber's own buffer holds (the rest: sender and server),
        # and how choppy the audio was (samples the receiver had to make up)
        out[f"{who}_{load}_subscriber_jitter_buffer_ms"] = jitter_ms
        out[f"{who}_{load}_subscriber_concealed_pct"] = concealed_pct
    return out


async def _baseline(url: str, api_key: str, api_secret: str, interrupts: int) -> dict[str, float]:
    """The same measurement for a worker built on the stock AvatarRunner (see bench_bargein)."""
    token = make_token(api_key, api_secret, "lobby", "baseline")
    worker = subprocess.Popen([sys.executable, "-m", "appliance.dev.bench_bargein", "--url", url],
                              env={**os.environ, "LIVEKIT_TOKEN": token})
    try:
        viewer = Viewer("baseline", keep_images=False)
        await viewer.connect(url, make_token(api_key, api_secret, "lobby", "baseline-viewer"))
        voice = AgentVoice("baseline")
        await voice.connect(url, make_token(api_key, api_secret, "lobby", "baseline-agent", agent=True))
        await asyncio.wait_for(viewer.video_started.wait(), 30)
        await asyncio.sleep(2.0)
        found = await _barge_in("baseline", voice, viewer, interrupts)
        await voice.close()
        await viewer.close()
        return found
    finally:
        _stop([worker])


def _start_burners(count: int) -> list[subprocess.Popen[bytes]]:
    """Processes that keep a core busy each, at the kiosk's own priority."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        proc.terminate()
    for proc in processes:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def screen_only(seconds: float, driver: str) -> dict[str, float]:
    """The kiosk without a room (its LiveKit server is unreachable): only the screen measured."""
    screen = Display(driver)
    with tempfile.TemporaryDirectory(prefix="appliance-bench-") as workdir:
        config = write_kiosk_config(Path(workdir), url="ws://127.0.0.1:9", api_key="k", api_secret="s" * 32)
        kiosk = KioskProcess(config, Path(workdir) / "kiosk.log", env=screen.env)
        kiosk.start()
        try:
            await kiosk.async_wait_for(lambda s: s["fps_10s"] > 20, 60, "rendered")
            assert kiosk.proc is not None
            sup, ren = kiosk.proc.pid, kiosk.renderer_pid()
            s0, r0, t0 = _cpu(sup), _cpu(ren), time.monotonic()
            results = {"seconds": seconds, **await screen_numbers(kiosk, seconds)}
            window = time.monotonic() - t0
            results["supervisor_cpu_s_per_s"] = (_cpu(sup) - s0) / window
            results["renderer_cpu_s_per_s"] = (_cpu(ren) - r0) / window
            return results
        finally:
            kiosk.stop()
            screen.close()


@contextlib.asynccontextmanager
async def dev_server_process(host: str, port: int = 7880) -> AsyncIterator[tuple[str, str, str]]:
    """The dev server as its own process, as a LiveKit server would run: (url, key, secret)."""
    key, secret = "benchkey", os.urandom(16).hex()
    server = subprocess.Popen([sys.executable, "-m", "appliance.dev.server", "--host", host,
                               "--port", str(port), "--key", key],
                              env={**os.environ, "LIVEKIT_API_SECRET": secret},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await _wait_listening(host, port, 30.0)
        yield f"ws://{host}:{port}", key, secret
    finally:
        _stop([server])


async def _run(seconds: float, host: str, interrupts: int, baseline: bool,
               display: str = "offscreen") -> dict[str, float]:
    async with dev_server_process(host) as (url, key, secret):
        with tempfile.TemporaryDirectory(prefix="appliance-bench-") as workdir:
            return await bench(url, key, secret, seconds, Path(workdir), interrupts, baseline, display)


async def _wait_listening(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the dev server never listened on {host}:{port}") from None
            await asyncio.sleep(0.1)
        else:
            writer.close()
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.dev.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring window (default 60)")
    parser.add_argument("--interrupts", type=int, default=12,
                        help="barge-ins measured per case (default 12)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the stock-AvatarRunner stand-in")
    parser.add_argument("--display", choices=["offscreen", "x11", "none"], default="offscreen",
                        help="where the screen child draws: SDL offscreen (default), x11 on an "
                             "Xvfb of the benchmark's own, or none (screen off)")
    parser.add_argument("--screen-only", action="store_true",
                        help="measure only the local screen (no room, no namespace)")
    args = parser.parse_args(argv)

    if args.screen_only:
        results = asyncio.run(screen_only(args.seconds, args.display))
        _print(f"appliance bench, local screen ({args.display})", results)
        os._exit(0)

    from appliance.dev import netns

    ok, why = netns.available()
    if not ok:
        print(f"bench: {why}", file=sys.stderr)
        return 1
    namespace = netns.create("appl-bench")
    try:
        netns.enter(namespace)
        results = asyncio.run(_run(args.seconds, namespace.host_a, args.interrupts,
                                   not args.no_baseline, args.display))
    finally:
        netns.remove(namespace)
    _print("appliance bench, reference avatar 512x512 @ 25 fps", results)
    os._exit(0)  # see cli.main: never let the native runtime abort at interpreter exit


def _print(title: str, results: dict[str, float]) -> None:
    print(f"{title}, {results.pop('seconds'):.0f} s window")
    for key, value in results.items():
        print(f"  {key:44s} {value:10.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
