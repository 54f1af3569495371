"""The base of every error an operator has to act on.

Each carries the setting it is about and the fix, and renders as one line:
``[section] key: what is wrong — how to fix it``. Subclasses by area:
``runtime.RuntimeFailure`` (rendering), ``manifest.UpdateError`` (model
updates), ``audio_devices.AudioDeviceError`` (speaker, microphone).
"""

from __future__ import annotations

__all__ = ["OperatorError"]


class OperatorError(Exception):
    def __init__(self, message: str, *, setting: str = "", fix: str = "") -> None:
        super().__init__(message)
        self.setting = setting
        self.fix = fix

    def operator_line(self) -> str:
        parts = [str(self)]
        if self.setting:
            parts.insert(0, f"{self.setting}:")
        if self.fix:
            parts.append(f"— {self.fix}")
        return " ".join(parts)
