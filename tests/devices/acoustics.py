"""A kiosk's room, emulated with ALSA ``file`` PCMs: what the speaker plays reaches the microphone.

The speaker is a ``file`` PCM writing ``speaker.raw*`` as PortAudio plays; the
microphone a ``file`` PCM reading ``mic.raw`` (``infile``) as PortAudio
captures. :class:`AcousticPath` runs in the test process: every few ms it reads
what the speaker has just played, sends it through a room response (delay,
direct path, reverberant tail, attenuation), adds the visitor's voice and a
little noise, and appends the sum to ``mic.raw`` just ahead of the reader
(whose position it reads from ``/proc/<pid>/fdinfo``). The echo therefore
follows the speaker's real timing, jitter included, as in a room; the test
keeps each component it wrote (echo, visitor) by microphone position, for the
analysis.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ASOUNDRC = """\
pcm.default {{ type null }}
pcm.kiosk_speaker {{
    type file
    slave.pcm {{ type null }}
    file "{speaker}"
    format "raw"
    truncate false
}}
pcm.kiosk_mic {{
    type file
    slave.pcm {{ type null }}
    file "/dev/null"
    infile "{mic}"
    format "raw"
}}
"""

RATE = 16000


def write_asoundrc(directory: Path) -> Path:
    path = directory / "asoundrc"
    path.write_text(ASOUNDRC.format(speaker=directory / "speaker.raw", mic=directory / "mic.raw"))
    return path


def prefill_mic(directory: Path, seconds: float = 3.0, noise_dbfs: float = -65) -> None:
    """The microphone's first seconds (quiet room noise), there before the kiosk opens it."""
    noise = np.random.default_rng(4).standard_normal(int(seconds * RATE)) * 32767 * 10 ** (noise_dbfs / 20)
    (directory / "mic.raw").write_bytes(np.rint(noise).astype(np.int16).tobytes())


class AcousticPath:
    def __init__(self, directory: Path, response: np.ndarray, *, lead_ms: float = 120,
                 noise_dbfs: float = -65, prefill_s: float = 3.0, seed: int = 5) -> None:
        self.dir = directory
        self.mic = directory / "mic.raw"
        self.h = response
        self.lead = int(lead_ms * RATE / 1000)
        self.noise = 32767 * 10 ** (noise_dbfs / 20)
        self._rng = np.random.default_rng(seed)
        if not self.mic.exists():
            prefill_mic(directory, prefill_s, noise_dbfs)
        self.written = self.mic.stat().st_size // 2
        self.echo_log: list[np.ndarray] = [np.zeros(self.written)]  # by microphone position
        self.visitor_log: list[np.ndarray] = [np.zeros(self.written)]
        self.visitor: tuple[int, np.ndarray] | None = None  # (start position, samples)
        self.underruns = 0
        self.reader_found = False
        self._queue = np.zeros(0)
        self._tail = np.zeros(len(response) - 1)
        self._speaker: tuple[Path, int] | None = None
        self.last_loud = 0.0  # monotonic time the speaker last played more than a whisper
        self.xrun_samples = 0  # echo dropped because the reader fell behind (a device overrun)

    def say(self, visitor: np.ndarray) -> int:
        """The visitor starts speaking now (at the next sample written); returns that position."""
        self.visitor = (self.written, visitor)
        return self.written

    def logs(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.echo_log), np.concatenate(self.visitor_log)

    # -- the speaker side ----------------------------------------------------------------

    def _played(self) -> np.ndarray:
        """What the speaker played since the last call (the newest file is the open stream)."""
        files = sorted(self.dir.glob("speaker.raw*"))
        if not files:
            return np.zeros(0)
        newest = files[-1]
        if self._speaker is None:  # what played before the room existed is not echoed
            self._speaker = (newest, newest.stat().st_size // 2 * 2)
        elif self._speaker[0] != newest:  # the device was reopened
            self._speaker = (newest, 0)
        path, offset = self._speaker
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        data = data[:len(data) - len(data) % 2]
        self._speaker = (path, offset + len(data))
        played = np.frombuffer(data, np.int16).astype(np.float64)
        if len(played) and np.abs(played).max() > 300:
            self.last_loud = time.monotonic()
        return played

    def _echo(self, played: np.ndarray) -> np.ndarray:
        """Stateful convolution (overlap-add) with the room response."""
        if not len(played):
            return played
        full = np.convolve(played, self.h)  # len(played) + len(h) - 1
        full[:len(self._tail)] += self._tail
        self._tail = full[len(played):]
        return full[:len(played)]

    # -- the microphone side -------------------------------------------------------------

    def _reader_position(self, pid: int) -> int | None:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with_target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if with_target == str(self.mic):
                    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                        if line.startswith("pos:"):
                            return int(line.split()[1]) // 2
        except OSError:
            return None
        return None

    def start(self, pid_of: Callable[[], int | None]) -> None:
        """Run in a thread (regular timing, whatever the test's event loop does) until stop();
        ``pid_of()`` names the process that reads the microphone file."""
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pid_of,), name="acoustic-path",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    def _run(self, pid_of: Callable[[], int | None]) -> None:
        """Keep ``mic.raw`` ``lead`` samples ahead of the reader."""
        pid = None
        while not self._stopping.wait(0.004):
            pid = pid or pid_of()
            pos = self._reader_position(pid) if pid else None
            echo = self._echo(self._played())
            if pos is None:
                continue
            if not self.reader_found:  # start clean: only what plays from now on is echoed
                self.reader_found = True
                self._queue = np.zeros(RATE * 20 // 1000)  # a 20 ms cushion for jitter
                echo = echo[-RATE * 20 // 1000:]
            self._queue = np.concatenate([self._queue, echo])
            # a room has no queue: if the reader fell behind, what played meanwhile is lost to
            # it, as samples are in a real device's overrun (the echo stays in time)
            excess = len(self._queue) - RATE * 250 // 1000
            if excess > 0:
                self._queue = self._queue[excess:]
                self.xrun_samples += excess
            if pos >= self.written:  # the reader caught up: it read stale data
                self.underruns += 1
            want = pos + self.lead - self.written
            if want <= 0:
                continue
            take = min(want, len(self._queue))
            if take < want:  # the speaker fell behind: the room hears silence meanwhile
                self.underruns += 1
            e = np.concatenate([self._queue[:take], np.zeros(want - take)])
            self._queue = self._queue[take:]
            v = np.zeros(want)
            if self.visitor is not None:
                start, voice = self.visitor
                lo = self.written - start
                if lo < len(voice):
                    part = voice[max(lo, 0):lo + want]
                    v[max(0, -lo):max(0, -lo) + len(part)] = part
            self._append(e, v, self._rng.standard_normal(want) * self.noise)

    def _append(self, echo: np.ndarray, visitor: np.ndarray, noise: np.ndarray) -> None:
        mix = np.clip(np.rint(echo + visitor + noise), -32768, 32767).astype(np.int16)
        with open(self.mic, "ab") as f:
            f.write(mix.tobytes())
        self.written += len(mix)
        self.echo_log.append(echo)
        self.visitor_log.append(visitor)


class AcousticProcess:
    """:class:`AcousticPath` in a process of its own (own GIL, real-time priority): in the test
    process the dev server and the listener would hold up the room's clock.

    Same surface as the path: ``say()``, ``written``, ``last_loud_age``, ``reader_found``,
    ``underruns``, ``xrun_samples``, ``logs()`` (after ``stop()``)."""

    def __init__(self, directory: Path, response: np.ndarray, visitor: np.ndarray, pid: int) -> None:
        import subprocess
        import sys

        np.save(directory / "response.npy", response)
        np.save(directory / "visitor.npy", visitor)
        self._dir = directory
        self._proc = subprocess.Popen(
            [sys.executable, __file__, str(directory), str(pid)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1)
        self._state = self._ask("state")

    def _ask(self, command: str) -> dict[str, float]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(command + "\n")
        line = self._proc.stdout.readline()
        return {k: float(v) for k, v in (item.split("=") for item in line.split())}

    def refresh(self) -> AcousticProcess:
        self._state = self._ask("state")
        return self

    def __getattr__(self, name: str) -> float:
        return self.__dict__["_state"][name]

    def say(self) -> int:
        return int(self._ask("say")["at"])

    def stop(self) -> None:
        self._state = self._ask("stop")
        self._proc.wait(10)

    def logs(self) -> tuple[np.ndarray, np.ndarray]:
        data = np.load(self._dir / "path-logs.npz")
        return data["echo"], data["visitor"]


def _serve(directory: Path, pid: int) -> None:
    import sys

    path = AcousticPath(directory, np.load(directory / "response.npy"))
    visitor = np.load(directory / "visitor.npy")
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))
    path.start(lambda: pid)

    def state(**extra: float) -> str:
        values = dict(written=path.written, last_loud_age=time.monotonic() - path.last_loud,
                      reader_found=float(path.reader_found), underruns=path.underruns,
                      xrun_samples=path.xrun_samples, **extra)
        return " ".join(f"{k}={v}" for k, v in values.items())

    for line in sys.stdin:
        command = line.strip()
        if command == "say":
            print(state(at=path.say(visitor)), flush=True)
        elif command == "stop":
            path.stop()
            echo, voice = path.logs()
            np.savez(directory / "path-logs.npz", echo=echo, visitor=voice)
            print(state(), flush=True)
            return
        else:
            print(state(), flush=True)


if __name__ == "__main__":
    import sys

    _serve(Path(sys.argv[1]), int(sys.argv[2]))
