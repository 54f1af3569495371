"""Local audio: the avatar's voice on a speaker, and a microphone for the room.

Both run PortAudio (through PyAudio) with *blocking* I/O in one thread per
device, so the asyncio loop never waits on a sound card:

    frame pump ─ Speaker.play(640 samples) ─► bounded queue ─► writer thread ─► PortAudio
    PortAudio ─► reader thread ─► call_soon_threadsafe ─► bounded queue ─► async for frame in mic

Things that shape this module (measured with PortAudio 19.6 / alsa-lib 1.2.8):

* Devices are opened by (part of) their PortAudio name, at 16 kHz when the
  device takes it, else at its own rate with a stateful polyphase resampler.
* Some ALSA devices never block (the ``null`` and ``file`` plugins, some virtual
  cards): I/O returns at once, so an unpaced loop would spin a core. A pacer keeps
  each thread at real time on such devices; a device that blocks sets the pace.
* PortAudio reads the device list once, in ``Pa_Initialize``, and
  ``Pa_Terminate`` closes every open stream: the list is re-read only while no
  stream is open and ``/proc/asound/cards`` changed (a USB card came or went).
* alsa-lib and libjack print to stderr while PortAudio probes devices; those
  messages go to this module's debug log instead.

Errors an operator must act on are ``AudioDeviceError`` with one line that
names the setting and the fix.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.errors import OperatorError
from appliance.retry import Backoff
from appliance.runtimes import AUDIO_SAMPLE_RATE

if TYPE_CHECKING:
    from livekit import rtc

__all__ = [
    "AudioDeviceError",
    "AudioHost",
    "Microphone",
    "Resampler",
    "Speaker",
]

log = logging.getLogger("appliance.devices")

FRAME_MS = 20  # microphone frames handed to the room, and the I/O period of both threads
SPEAKER_QUEUE_MS = 200  # at most this much audio waits for the speaker; older audio is dropped
SPEAKER_PREFILL_MS = 40  # after running dry, wait for one avatar frame before playing again
SPEAKER_MARGIN_S = 0.01  # write silence this long before the device would run dry
MIC_QUEUE_FRAMES = 25  # 500 ms of microphone audio waits for the room, then the oldest goes
RETRY_MAX_S = 10.0  # longest wait between attempts to reopen a lost device


class AudioDeviceError(OperatorError):
    """A device cannot be used; ``operator_line()`` says which setting and how to fix it."""

    def __init__(self, setting: str, message: str, fix: str = "") -> None:
        super().__init__(message, setting=setting, fix=fix)


# -- native library noise -------------------------------------------------------------------

_ALSA_HANDLER = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p
)
_JACK_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_native_handlers: list[Any] = []  # keep the ctypes callbacks alive


def _quiet_native_logs() -> None:
    """Send alsa-lib's and libjack's stderr chatter to the debug log (once per process)."""
    if _native_handlers:
        return

    def on_alsa(file: bytes, line: int, function: bytes, err: int, fmt: bytes) -> None:
        log.debug("alsa-lib %s:%d %s: %s", file.decode(errors="replace"), line,
                  function.decode(errors="replace"), fmt.decode(errors="replace"))

    def on_jack(message: bytes) -> None:
        log.debug("libjack: %s", message.decode(errors="replace"))

    alsa, jack = _ALSA_HANDLER(on_alsa), _JACK_HANDLER(on_jack)
    _native_handlers.extend([alsa, jack])
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libasound.so.2").snd_lib_error_set_handler(alsa)
    with contextlib.suppress(OSError, AttributeError):
        libjack = ctypes.CDLL("libjack.so.0")
        libjack.jack_set_error_function(jack)
        libjack.jack_set_info_function(jack)


# -- resampling ------------------------------------------------------------------------------


class Resampler:
    """Stateful polyphase resampler (windowed-sinc low-pass) for mono float audio.

    Chunks may have any length; the output is continuous across chunks, with a
    delay of about ``taps / 2`` input samples (under 1 ms). Same rate in and out:
    the samples pass through unchanged.
    """

    def __init__(self, rate_in: int, rate_out: int, taps: int = 16) -> None:
        self.rate_in, self.rate_out = rate_in, rate_out
        g = math.gcd(rate_in, rate_out)
        self._up, self._down = rate_out // g, rate_in // g
        up, down = self._up, self._down
        # taps per phase, counted at the lower of the two rates so decimation filters enough
        self._k = max(2, math.ceil(taps * max(up, down) / up))
        n = self._k * up
        cutoff = 0.45 / max(up, down)  # cycles per upsampled sample: 90 % of the lower Nyquist
        j = np.arange(n) - (n - 1) / 2
        h = 2 * cutoff * np.sinc(2 * cutoff * j) * np.kaiser(n, 8.0)
        h *= up / h.sum()
        self._poly = h.reshape(self._k, up).T.astype(np.float32)  # [phase, tap] = h[phase + tap*up]
        self._hist = np.zeros(self._k - 1, np.float32)
        self._t = 0  # next output's position on the upsampled grid, from the chunk's start

    def process(self, samples: np.ndarray) -> np.ndarray:
        x = np.asarray(samples, np.float32)
        if self._up == self._down:
            return x
        up, down, k = self._up, self._down, self._k
        buf = np.concatenate([self._hist, x])
        span = len(x) * up
        count = max(0, -(-(span - self._t) // down))
        t = self._t + down * np.arange(count)
        idx = (t // up)[:, None] + (k - 1) - np.arange(k)[None, :]
        out = np.einsum("ij,ij->i", self._poly[t % up], buf[idx])
        self._t += count * down - span
        self._hist = buf[len(buf) - (k - 1):]
        return out


def _to_int16(samples: np.ndarray, gain: float = 1.0) -> np.ndarray:
    scaled = samples * gain if gain != 1.0 else samples
    return np.clip(np.rint(scaled), -32768, 32767).astype(np.int16)


class _Pacer:
    """Keeps blocking I/O at real time on devices that never block, and knows how much
    audio the device still holds.

    ``wait()`` sleeps while the thread is more than ``slack_s`` ahead of the
    clock. An I/O call that did block re-anchors the clock (the device then
    holds ``buffered_s``), so a real device sets the pace and the pacer only
    steps in for devices without one.
    """

    def __init__(self, rate: int, period_frames: int, stop: threading.Event,
                 buffered_s: float = 0.0) -> None:
        self._rate = rate
        self._period_s = period_frames / rate
        self._slack_s = max(2 * self._period_s, buffered_s)
        self._buffered_s = buffered_s
        self._stop = stop
        self._t0 = time.monotonic()
        self._frames = 0

    def ahead(self) -> float:
        """Seconds of audio written and not yet played (reads: read ahead of real time)."""
        return self._frames / self._rate - (time.monotonic() - self._t0)

    def wait(self) -> None:
        ahead = self.ahead()
        if ahead > self._slack_s:
            self._stop.wait(ahead - self._slack_s)

    def done(self, frames: int, started_at: float) -> None:
        now = time.monotonic()
        self._frames += frames
        if now - started_at > self._period_s / 4:  # the device made us wait: it keeps time
            self._t0 = now - self._frames / self._rate + self._buffered_s


# -- PortAudio -----------------------------------------------------------------------------


def _asound_cards() -> str:
    try:
        return Path("/proc/asound/cards").read_text()
    except OSError:
        return ""


def _kernel_card(wanted: str, cards: str) -> str:
    """The /proc/asound/cards line naming ``wanted``, as "N (its name)", or ""."""
    for line in cards.splitlines():
        number, _, rest = line.strip().partition(" ")
        if number.isdigit() and wanted and wanted in rest.lower():
            return f"{number} ({rest.split(':', 1)[-1].strip()})"
    return ""


class AudioHost:
    """One PortAudio for the process, shared by the speaker and the microphone.

    Opening, closing and listing happen under one lock; reads and writes do not.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pa: Any = None
        self._cards = ""
        self._open = 0  # streams open now

    def _pyaudio(self) -> Any:
        if self._pa is None:
            import pyaudio

            os.environ.setdefault("JACK_NO_START_SERVER", "1")  # PortAudio must never spawn jackd
            _quiet_native_logs()
            self._cards = _asound_cards()
            self._pa = pyaudio.PyAudio()
        return self._pa

    def _refresh(self) -> None:
        """Re-read the device list if a card came or went and no stream is open."""
        if self._pa is not None and self._open == 0 and _asound_cards() != self._cards:
            log.info("sound cards changed: re-reading the device list")
            self._pa.terminate()
            self._pa = None

    def _devices(self, output: bool) -> list[tuple[int, dict[str, Any]]]:
        pa = self._pyaudio()
        key = "maxOutputChannels" if output else "maxInputChannels"
        found = []
        for index in range(pa.get_device_count()):
            info = pa.get_device_info_by_index(index)
            if int(info.get(key, 0)) > 0:
                found.append((index, info))
        return found

    def open(self, setting: str, name: str, *, output: bool) -> _Stream:
        """Open the first device whose name matches ``name`` (exactly, else as a part)."""
        import pyaudio

        with self._lock:
            self._refresh()
            devices = self._devices(output)
            wanted = name.strip().lower()
            matches = [d for d in devices if d[1]["name"].lower() == wanted]
            matches += [d for d in devices if wanted in d[1]["name"].lower() and d not in matches]
            kind = "output" if output else "input"
            if not matches:
                have = ", ".join(repr(info["name"]) for _, info in devices[:12]) or "none"
                card = _kernel_card(wanted, self._cards)
                if card:
                    # PortAudio lists only devices it could open while enumerating: a card the
                    # kernel has but PortAudio does not is held by another program
                    raise AudioDeviceError(
                        setting, f"{name!r} is sound card {card} but cannot be opened as an {kind}:"
                        " probably busy", "stop the other program using it (fuser -v /dev/snd/*)")
                raise AudioDeviceError(
                    setting, f"no {kind} device matching {name!r} (have: {have})",
                    f"set {setting.split()[-1]} to one of these names, or empty to turn it off",
                )
            index, info = matches[0]
            rate, channels = self._negotiate(index, info, output)
            period = rate * FRAME_MS // 1000
            pa = self._pa
            try:
                stream = pa.open(
                    rate=rate, channels=channels, format=pyaudio.paInt16,
                    output=output, input=not output,
                    output_device_index=index if output else None,
                    input_device_index=None if output else index,
                    frames_per_buffer=period,
                )
            except (OSError, ValueError) as exc:
                raise AudioDeviceError(
                    setting, f"cannot open {kind} device {info['name']!r}: {exc}",
                    "is another program using it? (fuser -v /dev/snd/*)",
                ) from exc
            self._open += 1
            return _Stream(self, stream, str(info["name"]), rate, channels, period)

    def _negotiate(self, index: int, info: dict[str, Any], output: bool) -> tuple[int, int]:
        """16 kHz mono if the device takes it, else its own rate (then 48/44.1 kHz), else stereo."""
        import pyaudio

        pa = self._pa
        key = "maxOutputChannels" if output else "maxInputChannels"
        rates = dict.fromkeys([AUDIO_SAMPLE_RATE, int(info["defaultSampleRate"]), 48000, 44100])
        channel_counts = [c for c in (1, 2) if c <= int(info[key])]
        reasons: set[str] = set()
        for rate in rates:
            for channels in channel_counts:
                args: dict[str, Any] = (
                    {"output_device": index, "output_channels": channels, "output_format": pyaudio.paInt16}
                    if output else
                    {"input_device": index, "input_channels": channels, "input_format": pyaudio.paInt16}
                )
                try:
                    if pa.is_format_supported(rate, **args):
                        return rate, channels
                except ValueError as exc:
                    reasons.add(str(exc))
        setting = "[audio] speaker" if output else "[audio] microphone"
        why = "; ".join(sorted(reasons))
        if any("unavailable" in r.lower() or "busy" in r.lower() for r in reasons):
            raise AudioDeviceError(setting, f"{info['name']!r} is busy ({why})",
                                   "stop the other program using it (fuser -v /dev/snd/*)")
        raise AudioDeviceError(
            setting, f"{info['name']!r} takes none of 16/44.1/48 kHz, 16-bit, mono or stereo ({why})",
            "pick its 'plughw:' or 'default' name, which converts formats",
        )

    def _closed(self) -> None:
        with self._lock:
            self._open -= 1

    def close(self) -> None:
        with self._lock:
            if self._pa is not None and self._open == 0:
                self._pa.terminate()
                self._pa = None


class _Stream:
    """An open PortAudio stream and what was negotiated for it."""

    def __init__(self, host: AudioHost, stream: Any, name: str, rate: int, channels: int,
                 period: int) -> None:
        self.host, self.stream, self.name = host, stream, name
        self.rate, self.channels, self.period = rate, channels, period

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a device that vanished fails here too
            self.stream.stop_stream()
        with contextlib.suppress(Exception):
            self.stream.close()
        self.host._closed()


class _Device:
    """What the speaker and the microphone share: a thread, a stream, reopening with backoff."""

    setting = ""
    output = True

    def __init__(self, host: AudioHost, name: str, stream: _Stream) -> None:
        self.host, self.name = host, name
        self.device_name = stream.name
        self.lost_since: float | None = None  # monotonic time the device stopped working
        self.reopened = 0
        self._stream: _Stream | None = stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"audio-{self.setting.split()[-1]}",
                                        daemon=True)

    def _start(self) -> None:
        log.info("%s: %r at %d Hz, %d channel(s)", self.setting, self.device_name,
                 self._require().rate, self._require().channels)
        self._thread.start()

    def _require(self) -> _Stream:
        assert self._stream is not None
        return self._stream

    def _run(self) -> None:
        while not self._stop.is_set():
            stream = self._stream
            if stream is None:
                stream = self._reopen()
                if stream is None:
                    return
                self._stream = stream
                self._opened(stream)
            try:
                self._step(stream)
            except Exception as exc:  # OSError from PortAudio: the device went away or failed
                if not isinstance(exc, OSError):
                    log.exception("%s: unexpected error", self.setting)
                self._stream = None
                stream.close()
                self.lost_since = time.monotonic()
                log.warning("%s: %r stopped working (%s) — reopening it in the background; check"
                            " its cable", self.setting, self.device_name, exc,
                            extra={"reason": str(exc)})

    def _reopen(self) -> _Stream | None:
        backoff = Backoff(first_s=0.5, max_s=RETRY_MAX_S)
        while not self._stop.wait(backoff.next_delay()):
            try:
                stream = self.host.open(self.setting, self.name, output=self.output)
            except AudioDeviceError as exc:
                log.debug("%s: still unavailable: %s", self.setting, exc)
                continue
            gone = time.monotonic() - (self.lost_since or time.monotonic())
            log.info("%s: %r is back after %.0f s (%d Hz)", self.setting, stream.name, gone, stream.rate)
            self.device_name, self.lost_since = stream.name, None
            self.reopened += 1
            return stream
        return None

    def _opened(self, stream: _Stream) -> None:
        """A (re)opened stream: rebuild what depends on its rate."""

    def _step(self, stream: _Stream) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        stream, self._stream = self._stream, None
        if stream is not None and not self._thread.is_alive():
            stream.close()


class Speaker(_Device):
    """Plays the avatar's audio (16 kHz mono int16) on a local output device.

    ``play()`` never blocks: it queues at most ``SPEAKER_QUEUE_MS`` and drops the
    oldest audio beyond that. When the queue runs dry the device plays silence.
    """

    setting = "[audio] speaker"
    output = True

    def __init__(self, host: AudioHost, name: str, stream: _Stream, volume: float) -> None:
        super().__init__(host, name, stream)
        self.volume = volume
        self.underruns = 0  # times the queue ran dry while audio was expected
        self.dropped_samples = 0  # 16 kHz samples dropped because the queue was full
        self._cond = threading.Condition()
        self._queue: collections.deque[np.ndarray] = collections.deque()
        self._queued = 0
        self._primed = False
        self._resampler = Resampler(AUDIO_SAMPLE_RATE, stream.rate)
        self._pacer = self._new_pacer(stream)
        # called on the writer thread with each 16 kHz block as it goes to the device
        # (the echo canceller's far end); set before audio flows
        self.on_played: Callable[[np.ndarray], None] | None = None

    @classmethod
    def open(cls, name: str, volume: float = 1.0, host: AudioHost | None = None) -> Speaker:
        """Open the output device named (in part) ``name``; raises ``AudioDeviceError``."""
        host = host or AudioHost()
        speaker = cls(host, name, host.open(cls.setting, name, output=True), volume)
        speaker._start()
        return speaker

    def play(self, samples: np.ndarray) -> None:
        """Queue 16 kHz mono int16 samples; returns at once (safe from the event loop)."""
        if self.lost_since is not None or self._stop.is_set() or len(samples) == 0:
            return
        chunk = np.asarray(samples, np.int16).reshape(-1)
        limit = AUDIO_SAMPLE_RATE * SPEAKER_QUEUE_MS // 1000
        with self._cond:
            self._queue.append(chunk)
            self._queued += len(chunk)
            while self._queued > limit:
                excess = self._queued - limit
                head = self._queue[0]
                if len(head) <= excess:
                    self._queue.popleft()
                    dropped = len(head)
                else:
                    self._queue[0] = head[excess:]
                    dropped = excess
                self._queued -= dropped
                self.dropped_samples += dropped
            self._cond.notify()

    def clear(self) -> None:
        """Drop what is queued (barge-in: the agent interrupted the avatar)."""
        with self._cond:
            self._queue.clear()
            self._queued = 0
            self._primed = False

    def _take(self, count: int, wait_s: float) -> np.ndarray:
        """``count`` samples: queued audio, padded with silence when the queue runs dry."""
        prefill = AUDIO_SAMPLE_RATE * SPEAKER_PREFILL_MS // 1000
        with self._cond:
            need = count if self._primed else prefill
            if self._queued < need:
                self._cond.wait_for(lambda: self._queued >= need or self._stop.is_set(), wait_s)
            if not self._primed:
                if self._queued < prefill:
                    return np.zeros(count, np.int16)
                self._primed = True
            parts, have = [], 0
            while self._queue and have < count:
                head = self._queue.popleft()
                if have + len(head) > count:
                    self._queue.appendleft(head[count - have:])
                    head = head[:count - have]
                parts.append(head)
                have += len(head)
            self._queued -= have
            if have < count:
                self.underruns += 1
                self._primed = False
                parts.append(np.zeros(count - have, np.int16))
        return np.concatenate(parts)

    def _new_pacer(self, stream: _Stream) -> _Pacer:
        try:
            latency = float(stream.stream.get_output_latency())
        except Exception:
            latency = 0.0
        return _Pacer(stream.rate, stream.period, self._stop, max(latency, stream.period / stream.rate))

    def _opened(self, stream: _Stream) -> None:
        self.clear()
        self._resampler = Resampler(AUDIO_SAMPLE_RATE, stream.rate)
        self._pacer = self._new_pacer(stream)

    def _step(self, stream: _Stream) -> None:
        count = AUDIO_SAMPLE_RATE * FRAME_MS // 1000
        self._pacer.wait()
        # wait for late audio as long as the device still has some to play, then fill silence
        block = self._take(count, wait_s=max(0.0, self._pacer.ahead() - SPEAKER_MARGIN_S))
        if self.on_played is not None:
            self.on_played(_to_int16(block, self.volume))
        out = _to_int16(self._resampler.process(block), self.volume)
        if stream.channels > 1:
            out = np.repeat(out, stream.channels)
        frames = len(out) // stream.channels
        started = time.monotonic()
        stream.stream.write(out.tobytes(), frames, exception_on_underflow=False)
        self._pacer.done(frames, started)

    def delay_s(self) -> float:
        """How long a block handed to the device now takes to be heard: what the device
        still holds, at least its reported output latency."""
        stream = self._stream
        try:
            latency = float(stream.stream.get_output_latency()) if stream else 0.0
        except Exception:
            latency = 0.0
        return max(latency, self._pacer.ahead())

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        super().close()

    def stats(self) -> dict[str, Any]:
        return {"device": self.device_name, "lost": self.lost_since is not None,
                "underruns": self.underruns, "dropped_s": self.dropped_samples / AUDIO_SAMPLE_RATE,
                "reopened": self.reopened}


class Microphone(_Device):
    """Captures a local input device as 20 ms, 16 kHz mono ``rtc.AudioFrame``s.

    ``async for frame in microphone`` yields them on the event loop. At most
    ``MIC_QUEUE_FRAMES`` wait; beyond that the oldest are dropped and counted.
    Iteration ends when the microphone is closed.
    """

    setting = "[audio] microphone"
    output = False

    def __init__(self, host: AudioHost, name: str, stream: _Stream,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(host, name, stream)
        self.dropped_frames = 0
        self.frames_captured = 0
        self._loop = loop
        self._frames: collections.deque[rtc.AudioFrame] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._dropping = 0  # drops in the current episode (logged when it ends)
        self._pending = np.zeros(0, np.int16)
        self._resampler = Resampler(stream.rate, AUDIO_SAMPLE_RATE)
        self._pacer = _Pacer(stream.rate, stream.period, self._stop)
        # called on the reader thread with each 16 kHz chunk (any length) and the input
        # latency in seconds; returns the audio to publish (the echo canceller)
        self.process: Callable[[np.ndarray, float], np.ndarray] | None = None

    @classmethod
    def open(cls, name: str, loop: asyncio.AbstractEventLoop,
             host: AudioHost | None = None) -> Microphone:
        """Open the input device named (in part) ``name``; raises ``AudioDeviceError``."""
        host = host or AudioHost()
        microphone = cls(host, name, host.open(cls.setting, name, output=False), loop)
        microphone._start()
        return microphone

    def _opened(self, stream: _Stream) -> None:
        self._resampler = Resampler(stream.rate, AUDIO_SAMPLE_RATE)
        self._pacer = _Pacer(stream.rate, stream.period, self._stop)
        self._pending = np.zeros(0, np.int16)

    def _step(self, stream: _Stream) -> None:
        from livekit import rtc

        self._pacer.wait()
        started = time.monotonic()
        data = stream.stream.read(stream.period, exception_on_overflow=False)
        self._pacer.done(stream.period, started)
        samples = np.frombuffer(data, np.int16).astype(np.float32)
        if stream.channels > 1:
            samples = samples.reshape(-1, stream.channels).mean(axis=1)
        captured = _to_int16(self._resampler.process(samples))
        if self.process is not None:
            captured = self.process(captured, self._input_latency(stream))
        pending = np.concatenate([self._pending, captured])
        size = AUDIO_SAMPLE_RATE * FRAME_MS // 1000
        while len(pending) >= size:
            chunk, pending = pending[:size], pending[size:]
            frame = rtc.AudioFrame(chunk.tobytes(), AUDIO_SAMPLE_RATE, 1, size)
            self._call(self._deliver, frame)
        self._pending = pending

    @staticmethod
    def _input_latency(stream: _Stream) -> float:
        try:
            return float(stream.stream.get_input_latency())
        except Exception:
            return 0.0

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            self._loop.call_soon_threadsafe(callback, *args)

    def _deliver(self, frame: rtc.AudioFrame) -> None:
        """On the event loop: queue one frame, dropping the oldest when nobody keeps up."""
        self.frames_captured += 1
        self._frames.append(frame)
        if len(self._frames) > MIC_QUEUE_FRAMES:
            self._frames.popleft()
            self.dropped_frames += 1
            if self._dropping == 0:
                log.info("%s: frames are not being read; dropping the oldest", self.setting)
            self._dropping += 1
        self._wakeup.set()

    def _end(self) -> None:
        self._closed = True
        self._wakeup.set()

    def __aiter__(self) -> Microphone:
        return self

    async def __anext__(self) -> rtc.AudioFrame:
        while not self._frames:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._dropping:
            log.info("%s: %d frames were dropped while nobody read them", self.setting, self._dropping)
            self._dropping = 0
        return self._frames.popleft()

    def close(self) -> None:
        super().close()
        self._call(self._end)

    def stats(self) -> dict[str, Any]:
        return {"device": self.device_name, "lost": self.lost_since is not None,
                "frames": self.frames_captured, "dropped_frames": self.dropped_frames,
                "reopened": self.reopened}
