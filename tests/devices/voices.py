"""Speech for the echo tests: two espeak-ng voices at 16 kHz (deterministic for one espeak-ng)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
import wave

import numpy as np
import pytest

AVATAR_TEXT = ("Welcome to the lobby. I can tell you where the meeting rooms are, "
               "how to reach the station, and when the cafe opens. Ask me anything.")
VISITOR_TEXT = ("Hello, I am looking for room four hundred and twelve, "
                "and I would also like a coffee please.")


@functools.cache
def speech(text: str, voice: str) -> np.ndarray:
    """``text`` spoken by espeak-ng ``voice``, 16 kHz int16 (skips the test without espeak-ng)."""
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed (make setup installs it)")
    with tempfile.NamedTemporaryFile(suffix=".wav") as handle:
        subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", handle.name, text], check=True)
        with wave.open(handle.name) as w:
            rate, data = w.getframerate(), w.readframes(w.getnframes())
    x = np.frombuffer(data, np.int16).astype(np.float64)
    if rate != 16000:
        from appliance.devices.audio import Resampler

        x = Resampler(rate, 16000).process(x).astype(np.float64)
    return np.asarray(x / (np.abs(x).max() + 1e-9) * 0.5 * 32767, np.float64)


def avatar_voice() -> np.ndarray:
    return speech(AVATAR_TEXT, "en")


def visitor_voice() -> np.ndarray:
    return speech(VISITOR_TEXT, "en+f3")


def room_response(delay_ms: float, gain_db: float, rt60_s: float = 0.25, seed: int = 7) -> np.ndarray:
    """A synthetic loudspeaker→microphone path: delay, direct path, exponentially decaying tail."""
    rng = np.random.default_rng(seed)
    n_tail = int(rt60_s * 16000)
    tail = rng.standard_normal(n_tail) * np.exp(-6.9 * np.arange(n_tail) / n_tail) * 0.3
    h = np.zeros(int(delay_ms * 16) + n_tail + 1)
    start = int(delay_ms * 16)
    h[start] = 1.0
    h[start + 1:start + 1 + n_tail] += tail
    return h / np.sqrt(np.sum(h ** 2)) * 10 ** (gain_db / 20)


def echo_of(far: np.ndarray, h: np.ndarray) -> np.ndarray:
    return np.convolve(far, h)[:len(far)]


def db(energy_in: float, energy_out: float) -> float:
    return float(10 * np.log10((energy_in + 1e-9) / (energy_out + 1e-9)))


def energy(x: np.ndarray) -> float:
    return float(np.mean(np.asarray(x, np.float64) ** 2)) if len(x) else 0.0
