"""The shared-memory ring that carries frames from a renderer child to the supervisor.

The child creates it under the name the parent chose in ``Init``; the parent
unlinks the name as soon as it has attached, so nothing is left in /dev/shm
whatever dies later::

    slot i at i * slot_size:  u64 seq | u32 flags | u32 n_samples | pad to 64
                              | RGB image (h, w, 3) uint8 | int16 audio[audio_capacity]

The child sets ``seq = 0``, writes the slot, sets ``seq`` and then sends
``FrameReady(slot, seq)``. The parent copies the slot and checks ``seq``
before and after the copy; a slot that changed underneath it is dropped.
A slot can only change underneath the parent when it lags a whole ring
behind, which the parent avoids by dropping the oldest notifications first.
(On weakly ordered CPUs (ARM64) there is no explicit barrier between the
image stores and the ``seq`` store; the send/recv system calls between
writing and reading act as one, except in that lapped case.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from appliance.runtimes import Frame

__all__ = ["RingLayout", "Ring", "open_shm", "unlink_shm", "sweep_stale_segments", "SHM_PREFIX"]

log = logging.getLogger("appliance.renderer.ring")

@contextlib.contextmanager
def _untracked() -> Iterator[None]:
    # Python < 3.13 registers every SharedMemory with a resource-tracker process
    # (spawned on first use, one per process) that unlinks it at exit and warns.
    # We own the segment's lifetime ourselves, so keep it out: swap the tracker
    # that shared_memory sees (only that module's global) for a no-op meanwhile.
    real = shared_memory.resource_tracker  # type: ignore[attr-defined]

    class _NoTracker:
        @staticmethod
        def register(name: str, rtype: str) -> None:
            pass

        unregister = register

    shared_memory.resource_tracker = _NoTracker  # type: ignore[attr-defined]
    try:
        yield
    finally:
        shared_memory.resource_tracker = real  # type: ignore[attr-defined]


SHM_PREFIX = "appliance-r-"  # every ring segment's name starts with this


def open_shm(name: str, size: int = 0) -> shared_memory.SharedMemory:
    """Create (``size > 0``) or attach a POSIX shared-memory segment nobody else will unlink."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name, create=size > 0, size=size, track=False)  # type: ignore[call-arg]
    with _untracked():
        return shared_memory.SharedMemory(name, create=size > 0, size=size)


def unlink_shm(name: str) -> bool:
    """Remove the segment's name if it still exists; True if it did."""
    try:
        shm = open_shm(name)
    except FileNotFoundError:
        return False
    with _untracked():
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            return False
    return True


def sweep_stale_segments() -> list[str]:
    """Unlink ring segments left by a supervisor that died between a child's Init and Ready."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/dev/shm"):
            m = re.fullmatch(re.escape(SHM_PREFIX) + r".*-(\d+)-\d+", entry.name)
            if m and not _pid_alive(int(m.group(1))) and unlink_shm(entry.name):
                removed.append(entry.name)
    if removed:
        log.warning("removed stale shared memory left by a dead supervisor: %s", ", ".join(removed))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HEADER = 64
_SPEAKING, _END_OF_SPEECH = 1, 2


@dataclass(frozen=True)
class RingLayout:
    width: int
    height: int
    audio_capacity: int  # int16 samples per slot
    slots: int

    @property
    def image_bytes(self) -> int:
        return self.width * self.height * 3

    @property
    def slot_size(self) -> int:
        raw = _HEADER + self.image_bytes + 2 * self.audio_capacity
        return (raw + 63) // 64 * 64

    @property
    def size(self) -> int:
        return self.slots * self.slot_size


class Ring:
    """Numpy views onto the slots of one shared-memory segment."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: RingLayout) -> None:
        if shm.size < layout.size:
            raise ValueError(f"shared memory {shm.name} has {shm.size} bytes, needs {layout.size}")
        self.shm, self.layout = shm, layout
        buf = shm.buf
        assert buf is not None
        self._seq: list[np.ndarray] = []
        self._meta: list[np.ndarray] = []
        self._image: list[np.ndarray] = []
        self._audio: list[np.ndarray] = []
        h, w, cap = layout.height, layout.width, layout.audio_capacity
        for i in range(layout.slots):
            base = i * layout.slot_size
            self._seq.append(np.frombuffer(buf, np.uint64, 1, base))
            self._meta.append(np.frombuffer(buf, np.uint32, 2, base + 8))
            self._image.append(
                np.frombuffer(buf, np.uint8, h * w * 3, base + _HEADER).reshape(h, w, 3)
            )
            self._audio.append(
                np.frombuffer(buf, np.int16, cap, base + _HEADER + layout.image_bytes)
            )

    def write(self, slot: int, seq: int, frame: Frame) -> None:
        self._seq[slot][0] = 0
        n = min(len(frame.audio), self.layout.audio_capacity)
        self._meta[slot][:] = (_SPEAKING * frame.speaking | _END_OF_SPEECH * frame.end_of_speech, n)
        np.copyto(self._image[slot], frame.image)
        self._audio[slot][:n] = frame.audio[:n]
        self._seq[slot][0] = seq

    def read(self, slot: int, seq: int) -> Frame | None:
        """A copy of the slot's frame, or None if the slot no longer holds frame ``seq``."""
        seq_view = self._seq[slot]
        if seq_view[0] != seq:
            return None
        flags, n = (int(x) for x in self._meta[slot])
        image = self._image[slot].copy()
        audio = self._audio[slot][: min(n, self.layout.audio_capacity)].copy()
        if seq_view[0] != seq:
            return None
        return Frame(
            image,
            audio,
            speaking=bool(flags & _SPEAKING),
            end_of_speech=bool(flags & _END_OF_SPEECH),
        )

    def close(self) -> None:
        for views in (self._seq, self._meta, self._image, self._audio):
            views.clear()
        try:
            self.shm.close()
        except BufferError:  # a view escaped somewhere; the mapping goes when it is collected
            log.warning("shared memory %s still referenced at close", self.shm.name)
