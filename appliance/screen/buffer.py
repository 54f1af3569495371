"""The latest frame, shared between the supervisor (writer) and the screen child (reader).

An anonymous memfd, passed to the child as an inherited descriptor: it has no
name in /dev/shm, so nothing can leak it whoever dies. Two slots, so the child
reads one while the supervisor writes the other::

    0                 u64 seq (frames written so far; slot = seq % 2)
    8                 u64 writing (the frame being written now, or the last one)
    64 + 64 * i       slot i: u32 width | u32 height | f64 handed_at (CLOCK_MONOTONIC)
    192 + i * MAX     slot i: RGB image (height, width, 3) uint8

The child checks ``writing`` after using a slot: if the writer started two frames
ahead meanwhile, the slot may have changed underneath it and it takes the next one.
``handed_at`` is when the frame reached the sink: the child subtracts it from
the time its present returned (one clock for every process on the machine).
"""

from __future__ import annotations

import mmap
import os
import time

import numpy as np

__all__ = ["FrameBuffer", "MAX_SIDE"]

MAX_SIDE = 1920  # [avatar] width/height are at most this
_MAX_IMAGE = MAX_SIDE * MAX_SIDE * 3
_SLOTS_AT = 64
_IMAGES_AT = 192
SIZE = _IMAGES_AT + 2 * _MAX_IMAGE  # pages are only allocated once touched


class FrameBuffer:
    """Both sides: ``FrameBuffer.create()`` in the supervisor, ``FrameBuffer(fd)`` in the child."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, SIZE)
        self._seq = np.frombuffer(self._map, np.uint64, 1, 0)
        self._writing = np.frombuffer(self._map, np.uint64, 1, 8)
        self._dims = [np.frombuffer(self._map, np.uint32, 2, _SLOTS_AT + 64 * i) for i in (0, 1)]
        self._times = [np.frombuffer(self._map, np.float64, 1, _SLOTS_AT + 64 * i + 8) for i in (0, 1)]
        self._images = [np.frombuffer(self._map, np.uint8, _MAX_IMAGE, _IMAGES_AT + _MAX_IMAGE * i)
                        for i in (0, 1)]

    @classmethod
    def create(cls) -> FrameBuffer:
        fd = os.memfd_create("appliance-screen", os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE)
        return cls(fd)

    # -- the supervisor ------------------------------------------------------------------

    def write(self, image: np.ndarray, handed_at: float | None = None) -> None:
        h, w = image.shape[:2]
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"screen frames are RGB uint8 (h, w, 3), got {image.dtype} {image.shape}")
        if h > MAX_SIDE or w > MAX_SIDE:
            raise ValueError(f"frame {w}x{h} is larger than {MAX_SIDE}x{MAX_SIDE}")
        seq = int(self._seq[0]) + 1
        slot = seq % 2
        self._writing[0] = seq
        self._images[slot][: h * w * 3] = image.reshape(-1)  # copies a non-contiguous view too
        self._dims[slot][:] = (w, h)
        self._times[slot][0] = time.monotonic() if handed_at is None else handed_at
        self._seq[0] = seq

    # -- the child -----------------------------------------------------------------------

    @property
    def seq(self) -> int:
        return int(self._seq[0])

    def slot(self, seq: int) -> tuple[np.ndarray, float]:
        """The image (a view into shared memory, not a copy) and handed_at of frame ``seq``.

        Use it, then call ``still_valid(seq)``: False means it may be torn."""
        slot = seq % 2
        w, h = (int(x) for x in self._dims[slot])
        image = self._images[slot][: h * w * 3].reshape(h, w, 3)
        return image, float(self._times[slot][0])

    def still_valid(self, seq: int) -> bool:
        return int(self._writing[0]) <= seq + 1  # the writer has not started on our slot again

    def close(self) -> None:
        self._seq = self._writing = self._dims = self._times = self._images = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:  # a view escaped; the mapping goes when it is collected
            pass
        os.close(self.fd)
