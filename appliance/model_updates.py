"""Driving model updates on a live kiosk: poll, wait for a good moment, warm, swap, judge.

``models.py`` knows the store and the downloads; this module decides *when*
and *how* a staged model goes live, through two callbacks the supervisor gives:

    check (every [models] check_interval_s, or now on SIGHUP / `appliance models update --now`)
      └─ staged ─► wait for the window and for silence ─► warm it in a second renderer
           ├─ no healthy frames within warmup_timeout_s ─► mark bad (never retried until its
           │                                               version changes); the old one serves on
           └─ healthy ─► activate (atomic switch on disk) ─► swap on a frame boundary
                 └─ soak: still healthy after SOAK_S? ─► mark good : mark bad, swap back

A power cut anywhere is safe: before ``activate`` the old model boots; after it,
an unconfirmed current model is on trial at boot (``startup_trial``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.config import Config
from appliance.manifest import UpdateError, parse_public_key
from appliance.models import ModelEntry, ModelStore, Outcome, Updater, UpdaterSettings, in_window

__all__ = ["ModelUpdates", "SOAK_S"]

log = logging.getLogger("appliance.model_updates")

SOAK_S = 5.0  # a swapped-in model must stay healthy this long before it is confirmed good

# swap(entry, deadline_s) -> None on success, else the operator-facing reason it failed;
# entry None means the configured [avatar] model (what served before the store had one)
SwapFn = Callable[[ModelEntry | None, float], Awaitable[str | None]]


def trusted_keys(spec: str) -> list[Any]:
    """``[models] public_key``: one or more keys (``ed25519:…`` or .pub paths), comma-separated."""
    return [parse_public_key(part.strip()) for part in spec.split(",") if part.strip()]


class ModelUpdates:
    def __init__(
        self,
        config: Config,
        *,
        swap: SwapFn,
        is_idle: Callable[[], bool],
        healthy: Callable[[], bool],
    ) -> None:
        models = config.models
        self.config = config
        self.store = ModelStore(models.directory, keep_previous=models.keep_previous)
        self.updater = Updater(
            self.store, models.manifest_url, trusted_keys(models.public_key),
            settings=UpdaterSettings(min_free_mb=models.min_free_mb),
        )
        self._swap = swap
        self._is_idle = is_idle
        self._healthy = healthy
        self._wake = asyncio.Event()
        self.waiting_for = ""  # why a staged model is not live yet (window, speech)
        self.last_result = ""

    @property
    def enabled(self) -> bool:
        return bool(self.config.models.manifest_url)

    def current(self) -> ModelEntry | None:
        """The model the store says should serve (None: use [avatar] model)."""
        try:
            self.store.open()
            return self.store.current()
        except (UpdateError, OSError) as exc:
            log.error("model store %s unusable: %s", self.store.root, exc)
            return None

    def check_now(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Poll forever (monotonic clock, jittered so a fleet does not hit the server at once)."""
        interval = self.config.models.check_interval_s
        while True:
            await self.check_and_apply()
            delay = interval * random.uniform(0.9, 1.1)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._wake.clear()

    async def check_and_apply(self) -> None:
        try:
            result = await self.updater.check_once()
        except UpdateError as exc:
            self.last_result = exc.operator_line()
            log.error("model update: %s", self.last_result, extra={"reason": self.last_result})
            return
        self.last_result = result.message
        if result.outcome is not Outcome.STAGED or result.entry is None:
            log.info("model update: %s", result.message)
            return
        await self._wait_for_moment()
        await self.go_live(result.entry)

    async def _wait_for_moment(self) -> None:
        models = self.config.models
        while True:
            if models.update_window and not in_window(dt.datetime.now(), models.update_window):
                self.waiting_for = f"the update window {models.update_window}"
            elif models.only_when_idle and not self._is_idle():
                self.waiting_for = "the avatar to finish speaking"
            else:
                self.waiting_for = ""
                return
            await asyncio.sleep(1.0 if "speaking" in self.waiting_for else 30.0)

    async def go_live(self, entry: ModelEntry) -> bool:
        """Warm, activate, swap, soak; on any failure the old model keeps (or goes back to) serving."""
        version = entry.version
        reason = await self._swap(entry, self.config.models.warmup_timeout_s)
        if reason is not None:
            self._bad(version, reason)
            return False
        await asyncio.to_thread(self.updater.activate, version)  # fsyncs: off the event loop
        soak_until = time.monotonic() + SOAK_S
        while time.monotonic() < soak_until:
            await asyncio.sleep(0.5)
            if not self._healthy():
                back = self._bad(version, f"stopped rendering within {SOAK_S:.0f} s of going live")
                await self._swap(back if back is not None and back.path else None,
                                 self.config.models.warmup_timeout_s)
                return False
        await asyncio.to_thread(self.updater.mark_good, version)
        log.info("model %s %s is live and confirmed", entry.name, version, extra={"model": version})
        return True

    def _bad(self, version: str, reason: str) -> ModelEntry | None:
        log.error("model %s marked bad: %s", version, reason, extra={"model": version, "reason": reason})
        return self.updater.mark_bad(version, reason)

    async def startup_trial(self) -> None:
        """After a power cut between activate and confirm: the current model must prove itself."""
        current = self.store.current()
        if current is None or current.confirmed:
            return
        deadline = time.monotonic() + self.config.models.warmup_timeout_s
        while time.monotonic() < deadline:
            if self._healthy():
                await asyncio.sleep(SOAK_S)
                if self._healthy():
                    self.updater.mark_good(current.version)
                    return
            await asyncio.sleep(0.5)
        back = self._bad(current.version, "did not render after a restart while on trial")
        await self._swap(back if back is not None and back.path else None, self.config.models.warmup_timeout_s)

    def status(self) -> dict[str, Any]:
        status = self.updater.status()
        status["waiting_for"] = self.waiting_for or None
        status["last_result"] = self.last_result or None
        return status
