"""Echo cancellation: one ``rtc.AudioProcessingModule`` fed both directions in 10 ms frames.

    speaker thread: every slice written to the device ─► far_end()  ─► process_reverse_stream
    mic thread:     every slice read from the device  ─► near_end() ─► set_stream_delay_ms
                                                                     + process_stream ─► room

The APM runs at 16 kHz mono, the avatar's rate (the microphone is resampled
before it gets here). It takes only multiples of 10 ms: any other length makes
the native side panic and abort the whole process (SIGABRT, not an exception),
which is why this runs in the audio child and why *all* cutting into 10 ms
frames happens in :class:`TenMs` (``tests/devices/test_aec.py`` feeds it odd
sizes). Without the far end the canceller removes nothing (0.3 dB measured),
so the speaker must call ``far_end`` with exactly what it plays.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from appliance.runtimes import AUDIO_SAMPLE_RATE

__all__ = ["TenMs", "EchoCanceller", "FRAME_10MS"]

FRAME_10MS = AUDIO_SAMPLE_RATE // 100  # 160 samples


class TenMs:
    """Cuts a stream of chunks of any length into whole 10 ms frames, keeping the rest.

    ``push(samples)`` returns the frames completed by this chunk (each exactly
    ``FRAME_10MS`` int16 samples); the remainder waits for the next chunk.
    """

    def __init__(self, size: int = FRAME_10MS) -> None:
        self.size = size
        self._rest = np.zeros(0, np.int16)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        data = np.concatenate([self._rest, np.asarray(samples, np.int16).reshape(-1)])
        whole = len(data) - len(data) % self.size
        self._rest = data[whole:].copy()
        return [data[i:i + self.size] for i in range(0, whole, self.size)]

    @property
    def pending(self) -> int:
        return len(self._rest)

    def reset(self) -> None:
        self._rest = np.zeros(0, np.int16)


class EchoCanceller:
    """The APM with echo cancellation and/or noise suppression, or a pass-through.

    ``far_end`` and ``near_end`` may run on different threads (as in LiveKit's
    own ``MediaDevices``); each direction has its own :class:`TenMs`. ``near_end``
    returns the processed samples, delayed by the slicing remainder (< 10 ms).
    """

    def __init__(self, *, echo_cancellation: bool, noise_suppression: bool) -> None:
        self.echo_cancellation = echo_cancellation
        self.noise_suppression = noise_suppression
        self._apm: Any = None
        if echo_cancellation or noise_suppression:
            from livekit import rtc

            self._apm = rtc.AudioProcessingModule(
                echo_cancellation=echo_cancellation, noise_suppression=noise_suppression,
                high_pass_filter=True)
        self._far, self._near = TenMs(), TenMs()
        self._lock = threading.Lock()  # the counters, read by the status thread
        self.far_frames = 0
        self.near_frames = 0
        self.delay_ms = 0
        self.cost_s = 0.0  # time spent inside the APM, both directions
        self._near_in = 0.0  # energy in and out of the capture side, for the ERLE estimate
        self._near_out = 0.0

    @property
    def active(self) -> bool:
        return self._apm is not None

    def _frame(self, samples: np.ndarray) -> Any:
        from livekit import rtc

        return rtc.AudioFrame(samples.tobytes(), AUDIO_SAMPLE_RATE, 1, len(samples))

    def far_end(self, samples: np.ndarray) -> None:
        """What the speaker is playing now (16 kHz int16, any length)."""
        if self._apm is None or not self.echo_cancellation:
            return
        for chunk in self._far.push(samples):
            started = time.perf_counter()
            self._apm.process_reverse_stream(self._frame(chunk))
            with self._lock:
                self.cost_s += time.perf_counter() - started
                self.far_frames += 1

    def near_end(self, samples: np.ndarray, delay_ms: float) -> np.ndarray:
        """Microphone samples (16 kHz int16, any length) → the same audio, echo removed."""
        if self._apm is None:
            return np.asarray(samples, np.int16)
        out = []
        for chunk in self._near.push(samples):
            frame = self._frame(chunk)
            started = time.perf_counter()
            if self.echo_cancellation:  # "if and only if echo processing is enabled"
                self.delay_ms = max(0, min(500, int(delay_ms)))
                self._apm.set_stream_delay_ms(self.delay_ms)
            self._apm.process_stream(frame)
            cleaned = np.frombuffer(frame.data, np.int16).copy()
            with self._lock:
                self.cost_s += time.perf_counter() - started
                self.near_frames += 1
                self._near_in = 0.99 * self._near_in + float(np.mean(chunk.astype(np.float64) ** 2))
                self._near_out = 0.99 * self._near_out + float(np.mean(cleaned.astype(np.float64) ** 2))
            out.append(cleaned)
        return np.concatenate(out) if out else np.zeros(0, np.int16)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            frames = self.far_frames + self.near_frames
            reduction = (10 * np.log10((self._near_in + 1e-9) / (self._near_out + 1e-9))
                         if self.near_frames else 0.0)
            return {
                "echo_cancellation": self.echo_cancellation,
                "noise_suppression": self.noise_suppression,
                "far_frames": self.far_frames,
                "near_frames": self.near_frames,
                "stream_delay_ms": self.delay_ms,
                "cost_ms_per_frame": 1000 * self.cost_s / frames if frames else 0.0,
                "cost_s": self.cost_s,
                # mic energy in / out over the last ~1 s: the echo removed while the avatar speaks
                "reduction_db": round(float(reduction), 1),
            }
