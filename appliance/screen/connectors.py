"""Which display connectors have a monitor, from sysfs: SDL reads them only once, at start.

    /sys/class/drm/card0-HDMI-A-1/status   "connected" | "disconnected" | "unknown"

``scan()`` is cheap (a few small files): the screen polls it every second and
restarts its child when the answer changes (a monitor plugged in or out).
The root is a parameter so tests can fake the tree.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DRM_SYSFS", "DEV_DRI", "scan", "connected", "has_drm_device"]

DRM_SYSFS = Path("/sys/class/drm")
DEV_DRI = Path("/dev/dri")


def scan(root: Path = DRM_SYSFS) -> dict[str, str]:
    """``{"HDMI-A-1": "connected", ...}`` for every connector of every card."""
    found: dict[str, str] = {}
    for status in sorted(root.glob("card*-*/status")):
        try:
            state = status.read_text().strip()
        except OSError:  # the connector went away between glob and read
            continue
        found[status.parent.name.split("-", 1)[1]] = state
    return found


def connected(states: dict[str, str]) -> list[str]:
    """Connectors that may have a monitor ("unknown": some drivers cannot tell; try them)."""
    return [name for name, state in states.items() if state in ("connected", "unknown")]


def has_drm_device(dev: Path = DEV_DRI) -> bool:
    return any(dev.glob("card*"))
