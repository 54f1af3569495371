"""The kiosk's local devices behind one facade: speaker, microphone, GPIO.

The running kiosk opens only GPIO here: its speaker and microphone belong to
the audio child (``audio_link.py``, ``audio_child.py``), beside the echo
canceller that needs both. The facade still opens them in-process for tools and
tests that want a plain speaker or microphone.

``Devices.open`` never raises for a device: each part that cannot be used
costs one log line (the setting, what is wrong, the fix), is listed in
``problems`` for ``appliance status``, and is left out (``speaker`` or
``microphone`` is None; a missing LED makes ``set_led`` a no-op).

    devices = await asyncio.to_thread(Devices.open, config.audio, config.gpio, loop,
                                       on_motion=..., on_button=...)
    fanout.add_sink(devices)                   # the speaker plays each frame's audio slice
    async for frame in devices.microphone: ... # 20 ms rtc.AudioFrame, 16 kHz mono
    devices.show_state(live=True)              # the LED: on while serving, blinking otherwise
    devices.close()

The parts live in ``audio.py`` (PortAudio) and ``gpio.py`` (gpiozero).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from appliance.config import AudioSection, GpioSection
from appliance.devices.audio import AudioDeviceError, AudioHost, Microphone, Speaker
from appliance.devices.gpio import Gpio, LedState
from appliance.errors import OperatorError
from appliance.runtimes import Frame

__all__ = ["Devices", "LedState"]

log = logging.getLogger("appliance.devices")


class Devices:
    """Speaker, microphone and GPIO as configured; any of them may be missing."""

    def __init__(self, host: AudioHost, speaker: Speaker | None, microphone: Microphone | None,
                 gpio: Gpio | None, errors: list[OperatorError]) -> None:
        self.speaker = speaker
        self.microphone = microphone
        self.gpio = gpio
        self.errors = errors  # one per part that could not be used
        self.problems = [e.operator_line() for e in errors]  # the same as operator lines
        self._host = host

    @classmethod
    def open(
        cls,
        audio: AudioSection,
        gpio: GpioSection,
        loop: asyncio.AbstractEventLoop,
        *,
        on_motion: Callable[[bool], None] | None = None,
        on_button: Callable[[bool], None] | None = None,
    ) -> Devices:
        """Open what the config names. Blocks while PortAudio probes devices (up to ~1 s on
        a Pi): call it through ``asyncio.to_thread``. Callbacks run on ``loop``."""
        host = AudioHost()
        errors: list[OperatorError] = []
        speaker = microphone = None
        if audio.speaker.strip():
            try:
                speaker = Speaker.open(audio.speaker, audio.speaker_volume, host)
            except AudioDeviceError as exc:
                errors.append(cls._report(exc))
        if audio.microphone.strip():
            try:
                microphone = Microphone.open(audio.microphone, loop, host)
            except AudioDeviceError as exc:
                errors.append(cls._report(exc))
        parts = Gpio.open(gpio, loop, on_motion=on_motion, on_button=on_button)
        errors += parts.errors
        return cls(host, speaker, microphone, parts, errors)

    @staticmethod
    def _report(exc: AudioDeviceError) -> AudioDeviceError:
        line = exc.operator_line()
        log.error("%s", line, extra={"reason": line})
        return exc

    # -- a frame sink: the speaker plays the audio slice the room gets ----------------

    async def send_frame(self, frame: Frame) -> None:
        if self.speaker is not None:
            self.speaker.play(frame.audio)  # non-blocking

    def drop_audio(self) -> None:
        """Barge-in: the speaker stops with the room."""
        if self.speaker is not None:
            self.speaker.clear()

    def show_state(self, *, live: bool) -> None:
        """The LED: on while the kiosk serves in the room, blinking while it cannot."""
        self.set_led(LedState.ON if live else LedState.BLINK)

    def set_led(self, state: LedState) -> None:
        if self.gpio is not None:
            self.gpio.set_led(state)

    def set_volume(self, volume: float) -> None:
        """Apply a new [audio] speaker_volume without reopening the device."""
        if self.speaker is not None:
            self.speaker.volume = volume

    def status(self) -> dict[str, Any]:
        return {
            "speaker": self.speaker.stats() if self.speaker else None,
            "microphone": self.microphone.stats() if self.microphone else None,
            "led": str(self.gpio.led_state) if self.gpio and self.gpio.led else None,
            "problems": list(self.problems),
        }

    def close(self) -> None:
        """Stop the threads, release the pins (LED off), close PortAudio. Blocks up to ~2 s."""
        if self.gpio is not None:
            self.gpio.set_led(LedState.OFF)
            self.gpio.close()
        for part in (self.speaker, self.microphone):
            if part is not None:
                part.close()
        self._host.close()
