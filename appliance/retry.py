"""One backoff for everything that retries: the renderer, the room, downloads, devices.

    backoff = Backoff(first_s=0.5, max_s=10.0, jitter=0.2)
    delay = backoff.next_delay()   # 0.5, 1, 2, 4 ... 10 (each ±20 %)
    backoff.reset()                # after a healthy run: the next failure starts over

``immediate=True`` makes the first retry immediate (a crashed renderer is
replaced at once; only repeated failures wait). Jitter keeps a fleet of kiosks
from retrying in lockstep after a shared outage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    first_s: float = 1.0  # the first non-zero delay
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.0  # 0.2 = each delay ×[0.8, 1.2]
    immediate: bool = False  # the first retry without delay
    failures: int = 0  # in a row, since the last reset
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next try."""
        self.failures += 1
        steps = self.failures - (2 if self.immediate else 1)
        if steps < 0:
            return 0.0
        delay = min(self.max_s, self.first_s * self.factor ** min(steps, 64))
        if self.jitter:
            delay *= self._rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return delay

    @property
    def at_cap(self) -> bool:
        """The delays stopped growing: worth saying louder (still trying, never giving up)."""
        steps = self.failures - (2 if self.immediate else 1)
        return steps >= 0 and self.first_s * self.factor ** min(steps, 64) >= self.max_s

    def reset(self) -> None:
        self.failures = 0
