"""GPIO: a motion sensor, a push button and a status LED, through gpiozero.

Pins are gpiozero names: "GPIO17" (BCM numbering), "BOARD11" (header pin),
"17" (same as GPIO17). The pin factory is gpiozero's default (lgpio on a
Raspberry Pi 5, RPi.GPIO / native on older boards; tests set
``gpiozero.Device.pin_factory = MockFactory()``).

gpiozero calls back from its own threads; events reach asyncio through
``loop.call_soon_threadsafe``. A machine without GPIO, or a pin that is not on
the board, costs one log line naming the setting, never the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import warnings
from collections.abc import Callable
from typing import Any

from appliance.config import GpioSection
from appliance.errors import OperatorError

__all__ = ["Gpio", "LedState"]

log = logging.getLogger("appliance.devices")

MOTION_BOUNCE_S = 0.1
BUTTON_BOUNCE_S = 0.05


class LedState(enum.Enum):
    OFF = "off"  # stopped
    ON = "on"  # live in the room
    BLINK = "blink"  # waiting for the network, or the renderer is not warm yet

    def __str__(self) -> str:
        return self.value


class Gpio:
    """The configured GPIO devices; ``problems`` holds one operator line per failure."""

    def __init__(self, loop: asyncio.AbstractEventLoop, blink_s: float = 0.5) -> None:
        self.problems: list[str] = []  # operator lines
        self.errors: list[OperatorError] = []  # the same, as records for the problem registry
        self.motion: Any = None
        self.button: Any = None
        self.led: Any = None
        self.led_state = LedState.OFF
        self._loop = loop
        self._blink_s = blink_s

    @classmethod
    def open(
        cls,
        config: GpioSection,
        loop: asyncio.AbstractEventLoop,
        *,
        on_motion: Callable[[bool], None] | None = None,
        on_button: Callable[[bool], None] | None = None,
        blink_s: float = 0.5,
    ) -> Gpio:
        """Create the devices whose pins are set; ``on_*`` run on ``loop`` with True/False
        for motion started/ended and button pressed/released."""
        gpio = cls(loop, blink_s)
        wanted = [(key, pin) for key, pin in
                  (("motion_pin", config.motion_pin), ("button_pin", config.button_pin),
                   ("led_pin", config.led_pin)) if pin.strip()]
        if not wanted:
            return gpio
        try:
            import gpiozero
        except ImportError as exc:  # pragma: no cover - gpiozero is a dependency
            gpio._problem([k for k, _ in wanted], f"gpiozero is not installed ({exc})",
                          "reinstall the appliance")
            return gpio
        for index, (key, pin) in enumerate(wanted):
            spec = pin.strip()
            try:
                with warnings.catch_warnings():  # gpiozero warns once per factory it skips
                    warnings.simplefilter("ignore")
                    gpio._create(gpiozero, key, spec, on_motion, on_button)
            except gpiozero.BadPinFactory as exc:
                # no GPIO on this machine: the same for every pin, so say it once
                gpio._problem([k for k, _ in wanted[index:]], f"no GPIO on this machine ({exc})",
                              "leave the [gpio] pins empty here; on a Raspberry Pi 5 install lgpio")
                break
            except gpiozero.GPIOPinInUse as exc:
                gpio._problem([key], f"{pin!r} is already in use ({exc})", "give each device its own pin")
            except (gpiozero.PinInvalidPin, gpiozero.PinUnknownPi, ValueError) as exc:
                gpio._problem([key], f"{pin!r} is not a pin on this board ({exc})",
                              'use a gpiozero name like "GPIO17" (BCM) or "BOARD11" (header pin),'
                              " or empty for none")
            except Exception as exc:  # GPIOZeroError, OSError from /dev/gpiochip*, ...
                gpio._problem([key], f"cannot use {pin!r} ({type(exc).__name__}: {exc})",
                              "check the wiring and that the service may open /dev/gpiochip*")
        return gpio

    def _problem(self, keys: list[str], message: str, fix: str) -> None:
        error = OperatorError(message, setting=f"[gpio] {', '.join(keys)}", fix=fix)
        self.errors.append(error)
        self.problems.append(error.operator_line())
        log.error("%s", error.operator_line(), extra={"reason": error.operator_line()})

    def _create(self, gpiozero: Any, key: str, pin: str,
                on_motion: Callable[[bool], None] | None,
                on_button: Callable[[bool], None] | None) -> None:
        if key == "motion_pin":
            motion = gpiozero.DigitalInputDevice(pin, pull_up=False, bounce_time=MOTION_BOUNCE_S)
            motion.when_activated = self._forward(on_motion, True)
            motion.when_deactivated = self._forward(on_motion, False)
            self.motion = motion
            log.info("[gpio] motion_pin: motion sensor on %s", motion.pin)
        elif key == "button_pin":
            button = gpiozero.Button(pin, pull_up=True, bounce_time=BUTTON_BOUNCE_S)
            button.when_pressed = self._forward(on_button, True)
            button.when_released = self._forward(on_button, False)
            self.button = button
            log.info("[gpio] button_pin: button on %s", button.pin)
        else:
            self.led = gpiozero.LED(pin)
            log.info("[gpio] led_pin: status LED on %s", self.led.pin)
            self._apply_led(LedState.OFF)

    def _forward(self, callback: Callable[[bool], None] | None, value: bool) -> Callable[[], None] | None:
        if callback is None:
            return None
        loop = self._loop

        def forward() -> None:  # on a gpiozero thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                loop.call_soon_threadsafe(callback, value)

        return forward

    def set_led(self, state: LedState) -> None:
        """on = live in the room, blink = waiting (network, renderer warming), off = stopped."""
        if state is self.led_state:
            return
        self.led_state = state
        if self.led is not None:
            self._apply_led(state)

    def _apply_led(self, state: LedState) -> None:
        try:
            if state is LedState.ON:
                self.led.on()
            elif state is LedState.BLINK:
                self.led.blink(on_time=self._blink_s, off_time=self._blink_s, background=True)
            else:
                self.led.off()
        except Exception as exc:  # never let a status light take the supervisor down
            log.warning("[gpio] led_pin: cannot switch the LED %s: %s", state, exc)

    def close(self) -> None:
        for device in (self.motion, self.button, self.led):
            if device is not None:
                with contextlib.suppress(Exception):
                    device.close()
        self.motion = self.button = self.led = None
