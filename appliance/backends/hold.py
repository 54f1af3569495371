"""Hold frames: what the kiosk shows while no backend delivers frames.

A renderer that crashes and restarts, a model that is reloading, a remote rung that is
starting (issue 13): for that time the room's tracks, the screen and the speaker would get
nothing, and a viewer's picture would freeze or its player stall. Instead the fan-out plays
a *hold loop*: two seconds of the current model idling, recorded from its own frames while
it was healthy, played forward at 25 fps with silence. Before a loop is recorded the last
good frame is repeated. The loop is kept in the cache directory, keyed by the model, so the
next boot has it before the model has loaded.

Only idle frames are recorded, and only an unbroken run of them: a loop never shows speech,
and never a seam from a model swap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from appliance.runtimes import AUDIO_SAMPLE_RATE, Frame

__all__ = ["HOLD_AFTER_INTERVALS", "HOLD_AFTER_S", "HOLD_FPS", "LOOP_FRAMES", "SPEECH_HICCUP_S", "HoldLoop", "hold_cache_dir"]

log = logging.getLogger("appliance.hold")

HOLD_FPS = 25.0
LOOP_FRAMES = 50  # two seconds: a blink and a breath
HOLD_AFTER_S = 0.08  # two frame intervals without a frame: hold (a viewer's gap stays < 100 ms)
# ... two of the source's own intervals, when it is slower than 25 fps: a slow renderer (a
# starved device) is not a stopped one, and hold frames between its frames would only take
# more of the CPU it lacks
HOLD_AFTER_INTERVALS = 2.0
# In the middle of speech a late frame is usually a hiccup, and its audio is still coming:
# silence from hold frames would push the rest of the reply later at every sink. So the
# first hold frames after a speaking one carry no audio; past this they carry silence (a
# wire with no audio at all makes subscribers' jitter buffers grow).
SPEECH_HICCUP_S = 0.5
SILENCE = np.zeros(int(AUDIO_SAMPLE_RATE / HOLD_FPS), dtype=np.int16)
NO_AUDIO = SILENCE[:0]


def hold_cache_dir() -> Path | None:
    """systemd's CacheDirectory (/var/cache/appliance), if the daemon has one."""
    directory = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if not directory and os.access("/var/cache/appliance", os.W_OK):
        directory = "/var/cache/appliance"
    return Path(directory) / "hold" if directory else None


class HoldLoop:
    """Records the current model's idle loop and plays it back; see the module docstring."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir
        self.key = ""
        self.loop: list[np.ndarray] = []  # the finished loop, or empty
        self.origin = "none"  # "recorded", "cached" (from an earlier run), "none"
        self._recording: list[np.ndarray] = []
        self._last: np.ndarray | None = None
        self._position = 0
        self._keep = True

    def use_model(self, key: str, keep: bool = True) -> None:
        """Frames now come from model ``key`` (any string naming runtime, model, size);
        ``keep=False``: its loop is not kept on disk (a remote backend's)."""
        if key == self.key:
            return
        self.key, self.loop, self.origin, self._recording = key, [], "none", []
        self._keep = keep
        path = self._path()
        if path is not None and path.exists():
            try:
                with np.load(path) as data:
                    self.loop = list(data["frames"])
                self.origin = "cached"
                log.info("hold loop for this model loaded from %s", path)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # torn: record anew
                log.warning("hold loop %s unreadable (%s): recording a new one", path, exc)

    def record(self, frame: Frame) -> None:
        """A real frame was shown: keep it as the last good one, and record idle ones."""
        self._last = frame.image
        if self.origin != "none" or not self.key:
            return
        if frame.speaking or (self._recording and self._recording[0].shape != frame.image.shape):
            self._recording = []
            return
        self._recording.append(frame.image)
        if len(self._recording) == LOOP_FRAMES:
            self.loop, self._recording, self.origin = self._recording, [], "recorded"
            self._save()

    def next_frame(self, with_audio: bool = True) -> Frame | None:
        """The next hold frame (silence, or no audio at all), or None while there is nothing
        to show."""
        if self.loop:
            image = self.loop[self._position % len(self.loop)]
            self._position += 1
        elif self._last is not None:
            image = self._last
        else:
            return None
        return Frame(image, SILENCE if with_audio else NO_AUDIO,
                     meta={"held": self.origin if self.loop else "last frame"})

    def status(self) -> dict[str, object]:
        return {"loop": self.origin, "loop_frames": len(self.loop)}

    def _path(self) -> Path | None:
        if self.cache_dir is None or not self.key or not self._keep:
            return None
        return self.cache_dir / f"{hashlib.sha256(self.key.encode()).hexdigest()[:16]}.npz"

    def _save(self) -> None:
        """Best effort, once per model: a full or read-only disk costs only the next boot's loop."""
        path = self._path()
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.tmp.npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(tmp, frames=np.stack(self.loop))
            os.replace(tmp, path)
            for other in path.parent.glob("*.npz"):  # one model at a time: the others are stale
                if other != path:
                    other.unlink(missing_ok=True)
            log.info("hold loop recorded (%d frames) and kept in %s", len(self.loop), path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("hold loop not kept on disk (%s): the next boot records it again", exc)
