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

The loop never ends of one bad input (a malformed manifest, a store failing with
EIO/ENOSPC/EACCES, a bug): the round's failure becomes ``problem`` (one line with the
fix, shown by ``appliance status``), and the next check comes after ``RETRY_S``,
doubling each failed round up to the check interval. The store failing to record a
switch sends the avatar back to what served before, so a restart shows the same; a bad
model it failed to record is recorded first thing in the next round.
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
from appliance.models.manifest import UpdateError, parse_public_key, store_failure
from appliance.models.store import ModelEntry, ModelStore
from appliance.models.updater import Outcome, Updater, UpdaterSettings, in_window
from appliance.retry import Backoff
from appliance.status.problems import ProblemOwner

__all__ = ["ModelUpdates", "RETRY_S", "SOAK_S"]

log = logging.getLogger("appliance.models.rollout")

SOAK_S = 5.0  # a swapped-in model must stay healthy this long before it is confirmed good
RETRY_S = 30.0  # after a failed round; doubles each time, at most [models] check_interval_s

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
        problems: ProblemOwner | None = None,
    ) -> None:
        models = config.models
        self._problems = problems  # the registry's "updates" part: one problem per failed round
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
        self.problem = ""  # the last round's failure, with the fix; "" after a good round
        self.failures = 0  # failed rounds in a row
        self.next_check_at: float | None = None  # time.monotonic()
        self._round_error: UpdateError | None = None
        self._unrecorded_bad: dict[str, str] = {}  # version -> reason, when the store failed to record it

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

    def retry_delay(self) -> float:
        """Seconds to the next check: the interval, or a growing retry after failed rounds."""
        interval = float(self.config.models.check_interval_s)
        if not self.failures:
            return interval
        return Backoff(first_s=RETRY_S, max_s=interval, failures=self.failures - 1).next_delay()

    async def run(self) -> None:
        """Poll forever (monotonic clock, jittered so a fleet does not hit the server at once)."""
        while True:
            ok = await self.check_and_apply()
            self.failures = 0 if ok else self.failures + 1
            delay = self.retry_delay() * random.uniform(0.9, 1.1)
            self.next_check_at = time.monotonic() + delay
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._wake.clear()

    async def check_and_apply(self) -> bool:
        """One round: check, and take a staged model live. False (and ``problem``) if it failed.

        Never raises, except cancellation.
        """
        self._round_error = None
        try:
            await self._round()
        except Exception as exc:
            self._round_error = self._as_update_error(exc)
        if self._round_error is None:
            self._set_problem(None)
            return True
        self._set_problem(self._round_error)
        self.last_result = self.problem
        return False

    def _set_problem(self, error: UpdateError | None) -> None:
        """The last round's failure (None: it went well), here and in the problem registry."""
        self.problem = error.operator_line() if error else ""
        if self._problems is None:
            if error is not None:
                log.error("model update: %s", self.problem, extra={"reason": self.problem})
        elif error is not None:
            self._problems.report_error(error)
        else:
            self._problems.clear()

    def _as_update_error(self, exc: Exception) -> UpdateError:
        if isinstance(exc, UpdateError):
            return exc
        if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
            return store_failure(exc, self.store.root)  # activate, mark_good, mark_bad
        log.error("model update: unexpected error", exc_info=exc)
        return UpdateError(f"model update failed: {type(exc).__name__}: {exc}", setting="[models]",
                           fix="this is a bug: report it with `journalctl -u appliance`; retrying, "
                               "the current model keeps serving")

    async def _round(self) -> None:
        for version, reason in list(self._unrecorded_bad.items()):  # first, what the store missed
            await asyncio.to_thread(self.updater.mark_bad, version, reason)
            del self._unrecorded_bad[version]
        result = await self.updater.check_once()
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
        before = self.store.current()  # what serves now (None: the [avatar] model): the way back
        reason = await self._swap(entry, self.config.models.warmup_timeout_s)
        if reason is not None:
            self._bad(version, reason, before)
            return False
        try:
            await asyncio.to_thread(self.updater.activate, version)  # fsyncs: off the event loop
        except UpdateError:
            # the store did not record the switch: go back, so that a restart shows the same
            await self._swap_back(before)
            raise
        soak_until = time.monotonic() + SOAK_S
        while time.monotonic() < soak_until:
            await asyncio.sleep(0.5)
            if not self._healthy():
                await self._swap_back(
                    self._bad(version, f"stopped rendering within {SOAK_S:.0f} s of going live", before))
                return False
        await asyncio.to_thread(self.updater.mark_good, version)
        log.info("model %s %s is live and confirmed", entry.name, version, extra={"model": version})
        return True

    async def _swap_back(self, entry: ModelEntry | None) -> None:
        await self._swap(entry if entry is not None and entry.path else None,
                         self.config.models.warmup_timeout_s)

    def _bad(self, version: str, reason: str, fallback: ModelEntry | None) -> ModelEntry | None:
        """Mark ``version`` bad; returns what should serve now (``fallback`` if the store fails)."""
        log.error("model %s marked bad: %s", version, reason, extra={"model": version, "reason": reason})
        try:
            return self.updater.mark_bad(version, reason)
        except UpdateError as exc:  # the store failed: recorded at the start of the next round
            self._round_error = exc
            self._unrecorded_bad[version] = reason
            return fallback

    async def startup_trial(self) -> None:
        """After a power cut between activate and confirm: the current model must prove itself.

        Never raises (except cancellation): a failure is the loop's ``problem``.
        """
        self._round_error = None
        try:
            await self._trial()
        except Exception as exc:
            self._round_error = self._as_update_error(exc)
        if self._round_error is not None:
            self._set_problem(self._round_error)

    async def _trial(self) -> None:
        current, previous = self.store.current(), self.store.previous()
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
        await self._swap_back(self._bad(current.version, "did not render after a restart while on trial",
                                        previous))

    def status(self) -> dict[str, Any]:
        status = self.updater.status()
        status["waiting_for"] = self.waiting_for or None
        status["last_result"] = self.last_result or None
        status["problem"] = self.problem or None
        status["next_check_in_s"] = (round(max(0.0, self.next_check_at - time.monotonic()), 1)
                                     if self.next_check_at is not None else None)
        return status
