"""`appliance say`: the avatar speaks a WAV file with no agent and no room.

For operators' announcements, and for a kiosk whose room is unreachable (the booted image's
screen test). The speech goes to the active backend exactly like an agent's: the mouth moves
on the screen and in the room, the speaker plays it. The conversation agent comes first: while
it is speaking, `appliance say` is refused rather than cutting its reply behind its back
(the agent would never hear that its reply ended).
"""

from __future__ import annotations

import io
import logging
import wave

import numpy as np

from appliance.room.agent import SpeechSink

__all__ = ["MAX_SPEAK_S", "SpeakError", "decode_wav", "speak"]

log = logging.getLogger("appliance.speak")

MAX_SPEAK_S = 60.0
CHUNK_S = 1.0  # pushed to the renderer in slices, as an agent's stream arrives
CONVERT = "convert it with `sox IN -b 16 OUT.wav` or `ffmpeg -i IN -c:a pcm_s16le OUT.wav`"


class SpeakError(ValueError):
    """The audio cannot be spoken; the message says how to fix it."""


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono int16 samples and the rate of a 16-bit PCM WAV file."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise SpeakError(f"not a PCM WAV file ({exc}): {CONVERT}") from None
    if width != 2:
        raise SpeakError(f"{8 * width}-bit samples, 16-bit needed: {CONVERT}")
    if not 8000 <= rate <= 48000:
        raise SpeakError(f"sample rate {rate} Hz, 8000-48000 Hz needed: {CONVERT}")
    pcm = np.frombuffer(raw, dtype="<i2")
    if channels > 1:
        pcm = pcm[: len(pcm) // channels * channels].reshape(-1, channels).mean(axis=1).astype(np.int16)
    seconds = len(pcm) / rate
    if seconds == 0:
        raise SpeakError("the file holds no audio")
    if seconds > MAX_SPEAK_S:
        raise SpeakError(f"{seconds:.0f} s of audio, at most {MAX_SPEAK_S:.0f} s: split it")
    return pcm, rate


def speak(sink: SpeechSink, pcm: np.ndarray, rate: int) -> bool:
    """Replace what the avatar is saying with ``pcm``; False if no renderer can take it."""
    sink.interrupt()
    step = int(rate * CHUNK_S)
    for start in range(0, len(pcm), step):
        if not sink.push_audio(pcm[start: start + step].tobytes(), rate):
            return False
    sink.flush()
    log.info("appliance say: %.1f s of speech (%d Hz)", len(pcm) / rate, rate)
    return True
