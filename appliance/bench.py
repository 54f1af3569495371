"""Benchmark: ``python -m appliance.bench`` (``make bench``) prints numbers, asserts nothing.

It runs the real thing, end to end: the dev server, the kiosk daemon as its
own process (supervisor + renderer child), and a subscriber that measures
what a viewer of the room sees. For ``--seconds`` (default 60) it reports:

- fps at the subscriber, p50/p99/max frame interval;
- CPU seconds per second of the supervisor process (publishing, encoding,
  protocol: everything except rendering) and of the renderer child;
- peak RSS of both;
- then it SIGKILLs the renderer and reports the gap in frames the subscriber saw.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from appliance.demo import Viewer, make_token
from appliance.status import query_status

__all__ = ["KioskProcess", "write_kiosk_config", "main"]


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


def _cpu(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    return 0.0


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    return 0.0


async def bench(url: str, api_key: str, api_secret: str, seconds: float, workdir: Path) -> dict[str, float]:
    config = write_kiosk_config(workdir, url=url, api_key=api_key, api_secret=api_secret)
    kiosk = KioskProcess(config, workdir / "kiosk.log")
    kiosk.start()
    try:
        await kiosk.async_wait_for(lambda s: s["room"]["state"] == "live", 60, "went live")
        viewer = Viewer("kiosk", keep_images=False)
        await viewer.connect(url, make_token(api_key, api_secret, "lobby", "bench-viewer"))
        await asyncio.wait_for(viewer.video_started.wait(), 30)
        await asyncio.sleep(3.0)  # let the encoder and the jitter buffers settle
        assert kiosk.proc is not None
        sup_pid, ren_pid = kiosk.proc.pid, kiosk.renderer_pid()
        start = CpuSample(_cpu(sup_pid), _cpu(ren_pid), time.monotonic())
        t0 = time.monotonic()
        peak_sup = peak_ren = 0.0
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(1.0)
            peak_sup, peak_ren = max(peak_sup, _rss_mb(sup_pid)), max(peak_ren, _rss_mb(ren_pid))
        end = CpuSample(_cpu(sup_pid), _cpu(ren_pid), time.monotonic())
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
        await viewer.close()
        return {
            "seconds": window,
            "fps_subscriber": frames_in_window / window,
            "interval_p50_ms": float(np.percentile(intervals, 50)),
            "interval_p99_ms": float(np.percentile(intervals, 99)),
            "interval_max_ms": float(np.max(intervals)),
            "supervisor_cpu_s_per_s": (end.supervisor_s - start.supervisor_s) / window,
            "renderer_cpu_s_per_s": (end.renderer_s - start.renderer_s) / window,
            "supervisor_peak_rss_mb": peak_sup,
            "renderer_peak_rss_mb": peak_ren,
            "gap_after_renderer_sigkill_ms": gap_ms,
        }
    finally:
        kiosk.stop()


async def _run(seconds: float, host: str) -> dict[str, float]:
    from appliance.devserver import DevServer

    key, secret = "benchkey", os.urandom(16).hex()
    server = DevServer(host=host, port=7880, api_key=key, api_secret=secret)
    await server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="appliance-bench-") as workdir:
            return await bench(f"ws://{host}:7880", key, secret, seconds, Path(workdir))
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring window (default 60)")
    args = parser.parse_args(argv)

    from appliance import netns

    ok, why = netns.available()
    if not ok:
        print(f"bench: {why}", file=sys.stderr)
        return 1
    namespace = netns.create("appl-bench")
    try:
        netns.enter(namespace)
        results = asyncio.run(_run(args.seconds, namespace.host_a))
    finally:
        netns.remove(namespace)
    print(f"appliance bench, reference avatar 512x512 @ 25 fps, {results.pop('seconds'):.0f} s window")
    for key, value in results.items():
        print(f"  {key:32s} {value:10.3f}")
    sys.stdout.flush()
    os._exit(0)  # see cli.main: never let the native runtime abort at interpreter exit


if __name__ == "__main__":
    sys.exit(main())
