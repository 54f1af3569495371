"""Benchmark of the fallback ladder: ``python -m appliance.dev.bench_ladder`` (root) prints
numbers, asserts nothing.

The real parts of ``tests/backends/test_ladder.py``: the dev server (its own process), the kiosk
daemon, a fake of bitHuman's cloud API spawning a real remote worker, a hidden viewer and an
agent speaking through LiveKit Agents' ``DataStreamAudioOutput``. Each of ``--rounds``:

- ``handover_s``: the local renderer child SIGSTOPped (as a hung native call) → the cloud's
  first frame at the viewer, with ``unhealthy_after_s`` = 2 s of it spent deciding;
- ``handover_gap_ms``: the viewer's longest wait for a frame meanwhile (hold frames bridge it);
- ``reply_to_voice_local_s`` / ``reply_to_voice_relayed_s``: the agent starts a reply → its
  voice at the viewer, rendered locally and relayed through the worker: the difference is
  the relay's latency;
- ``kiosk_cpu_local`` / ``kiosk_cpu_relaying``: the supervisor process's CPU seconds per second
  while the local renderer serves and while it relays the worker (decode + re-encode);
- ``failback_kiosk_gap_ms``: the kiosk's own longest wait between two frames to its tracks in
  the last 30 s (what the viewer waits beyond it is the WebRTC path);
- ``failback_s`` (the renderer let go → local frames at the viewer: ``recover_after_s`` = 6 s
  of it, doubled each round, since each hand-over follows a take-back within 10 min: the
  ladder's hysteresis) and ``failback_gap_ms``.

As ``bench.py``, it moves itself into a private network namespace with a veth pair.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from appliance.dev.bench import KioskProcess, _cpu, dev_server_process, write_kiosk_config
from appliance.dev.demo import AgentVoice, Viewer, make_token, read_wav
from appliance.dev.fake_bithuman import FakeCloud
from appliance.dev.remote_worker import tag_of

__all__ = ["Hang", "main"]

ROOM, KIOSK, BH_SECRET = "lobby", "kiosk-bench", "bh-bench-secret"


class Hang:
    """Keeps the kiosk's live renderer child SIGSTOPped, whichever child that is."""

    def __init__(self, kiosk: KioskProcess) -> None:
        self.kiosk, self.stopped = kiosk, set[int]()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            pid = (await asyncio.to_thread(self.kiosk.status))["renderer"]["pid"]
            if isinstance(pid, int) and pid not in self.stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    self.stopped.add(pid)
            await asyncio.sleep(0.1)

    async def release(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for pid in self.stopped:  # as the renderer would after its stall timeout
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _first(viewer: Viewer, since: float, rung: str | None) -> float | None:
    return next((f.at for f in viewer.frames if f.at > since and tag_of(f.image) == rung), None)


async def _until(what: str, get: object, timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    while (value := get()) is None:  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)
    return float(value)


async def _reply_to_voice(voice: AgentVoice, viewer: Viewer, pcm: np.ndarray, rate: int) -> float:
    """The agent starts a reply → the first loud audio at the viewer."""
    voice.finished_event.clear()
    said = time.monotonic()
    speaking = asyncio.create_task(voice.say(pcm, rate))

    def loud() -> float | None:
        for samples, at in zip(viewer.audio, viewer.audio_times, strict=False):
            if at > said and np.abs(samples).max() > 3000:
                return at
        return None

    heard = await _until("the reply at the viewer", loud, 30.0)
    await speaking
    await asyncio.wait_for(voice.finished_event.wait(), 30.0)
    return heard - said


async def _cpu_per_s(pid: int, seconds: float) -> float:
    before, started = _cpu(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (_cpu(pid) - before) / (time.monotonic() - started)


async def bench(url: str, key: str, secret: str, host: str, rounds: int, workdir: Path) -> dict[str, float]:
    cloud = FakeCloud(api_secret=BH_SECRET, host=host)
    await cloud.start()
    bh_secret = workdir / "bithuman.secret"
    bh_secret.write_text(BH_SECRET)
    bh_secret.chmod(0o600)
    config = write_kiosk_config(
        workdir, url=url, api_key=key, api_secret=secret, room=ROOM, identity=KIOSK,
        extra=(f'[avatar]\napi_secret_file = "{bh_secret}"\nstall_timeout_s = 1.0\n'
               f'[fallback]\nladder = ["local", "cloud"]\ncloud_api_url = "{cloud.url}"\n'
               'cloud_avatar_id = "A12BCD34"\nunhealthy_after_s = 2.0\nrecover_after_s = 6.0\n'))
    kiosk = KioskProcess(config, workdir / "kiosk.log")
    kiosk.start()
    viewer, voice = Viewer(KIOSK), AgentVoice(KIOSK)
    pcm, rate = read_wav()
    rows: dict[str, list[float]] = {}
    try:
        await kiosk.async_wait_for(lambda s: s["room"]["state"] == "live" and s["fps_10s"] > 10, 60, "went live")
        await viewer.connect(url, make_token(key, secret, ROOM, "viewer", hidden=True))
        await voice.connect(url, make_token(key, secret, ROOM, "agent", agent=True))
        await kiosk.async_wait_for(lambda s: s["agent"] == "agent", 20, "served the agent")
        await asyncio.sleep(3.0)  # the hold loop is recorded
        assert kiosk.proc is not None
        for _ in range(rounds):
            row = {"reply_to_voice_local_s": await _reply_to_voice(voice, viewer, pcm, rate),
                   "kiosk_cpu_local": await _cpu_per_s(kiosk.proc.pid, 10.0)}
            hung_at = time.monotonic()
            hang = Hang(kiosk)
            first = await _until("the cloud's frames", lambda: _first(viewer, hung_at, "cloud"))  # noqa: B023
            row["handover_s"] = first - hung_at
            row["handover_gap_ms"] = viewer.max_interval_ms(since=hung_at, until=first + 0.5)
            await asyncio.sleep(1.0)
            row["reply_to_voice_relayed_s"] = await _reply_to_voice(voice, viewer, pcm, rate)
            row["kiosk_cpu_relaying"] = await _cpu_per_s(kiosk.proc.pid, 10.0)
            await hang.release()
            released = time.monotonic()
            await kiosk.async_wait_for(lambda s: s["backend"]["active"] == "local", 120, "took the avatar back")
            local = await _until("local frames again", lambda: _first(  # noqa: B023
                viewer, max(f.at for f in viewer.frames if tag_of(f.image) == "cloud"), None))
            row["failback_s"] = local - released
            row["failback_gap_ms"] = viewer.max_interval_ms(since=local - 2.0, until=local + 2.0)
            # the same wait where the kiosk hands frames to its tracks: the rest is the WebRTC path
            row["failback_kiosk_gap_ms"] = float((await asyncio.to_thread(kiosk.status))["hold"]["longest_interval_ms_30s"])
            if os.environ.get("BENCH_DEBUG"):
                near = [(round(f.at - local, 3), tag_of(f.image)) for f in viewer.frames if local - 2.0 < f.at < local + 2.0]
                big = [(a, b) for a, b in zip(near, near[1:], strict=False) if b[0] - a[0] > 0.2]
                print("  around the fail-back (s from the first local frame, rung):", big, flush=True)
            await asyncio.sleep(3.0)
            for name, value in row.items():
                rows.setdefault(name, []).append(value)
            print("  round: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    finally:
        await voice.close()
        await viewer.close()
        await asyncio.to_thread(kiosk.stop)
        await cloud.stop()
    results = {"rounds": float(rounds)}
    for name, values in rows.items():
        results[f"{name}_p50"] = float(np.median(values))
        results[f"{name}_max"] = float(np.max(values))
    return results


async def _run(host: str, rounds: int) -> dict[str, float]:
    async with dev_server_process(host) as (url, key, secret):
        with tempfile.TemporaryDirectory(prefix="appliance-bench-ladder-") as workdir:
            return await bench(url, key, secret, host, rounds, Path(workdir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.dev.bench_ladder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="hand-over and take-back rounds (default 3)")
    args = parser.parse_args(argv)
    from appliance.dev import netns

    ok, why = netns.available()
    if not ok:
        print(f"bench_ladder: {why}", file=sys.stderr)
        return 1
    namespace = netns.create("appl-bladder")
    try:
        netns.enter(namespace)
        results = asyncio.run(_run(namespace.host_a, args.rounds))
    finally:
        netns.remove(namespace)
    print("appliance bench_ladder, local → cloud → local, reference avatar 512x512")
    for name, value in results.items():
        print(f"  {name:44s} {value:10.3f}")
    sys.stdout.flush()
    os._exit(0)  # see cli.main: never let the native runtime abort at interpreter exit


if __name__ == "__main__":
    sys.exit(main())
