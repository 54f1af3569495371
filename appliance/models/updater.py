"""The ``Updater``: find, verify, download and stage a newer model; the ``models`` commands.

The format of a signed manifest, keys and the operator's ``publish`` side live in
``manifest.py``; when a staged model goes live is ``rollout.py``'s business::

    Updater.check_once():  manifest (http(s) or a local path) ─► verify signature ─► newer,
                           compatible, not bad? ─► free-disk check ─► download with Range
                           resume into downloads/<sha256>.partial ─► size + sha256 ─► stage
    rollout:               warm the staged model in a second renderer ─► healthy frames ─►
                           activate(version) ─► switch on a frame boundary ─► mark_good(version)
                           (fails to load or render in time ─► mark_bad(version, reason))
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import fcntl
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp

from appliance.models.download import ProgressFn, UpdaterSettings, download, format_bytes
from appliance.models.manifest import (
    MAX_MANIFEST_BYTES,
    DiskFull,
    Manifest,
    ManifestError,
    StoreError,
    TrustedKey,
    UpdateError,
    check_compatible,
    parse_manifest,
    parse_public_key,
    resolve_url,
    store_failure,
    version_key,
)
from appliance.models.store import STATE_DIR, ModelEntry, ModelStore
from appliance.retry import Backoff
from appliance.status.states import StateCell

__all__ = [
    "Outcome", "UpdateResult", "UpdateState", "Updater", "UpdaterSettings", "cmd_models_list",
    "cmd_models_rollback", "cmd_models_update", "download", "in_window", "parse_window",
]

log = logging.getLogger("appliance.models.updater")

# -- the updater ---------------------------------------------------------------------


class UpdateState(enum.Enum):
    IDLE = "idle"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"  # a verified model waits for the supervisor to warm and activate it
    FAILED = "failed"  # the last check failed; see last_error

    def __str__(self) -> str:
        return self.name


class Outcome(enum.Enum):
    UP_TO_DATE = "up-to-date"  # the manifest names the current version
    OLDER = "older"  # the manifest names a version below the current one: ignored
    BAD = "bad"  # the manifest names a version marked bad: not retried
    STAGED = "staged"  # a new model is staged and ready: warm it, then activate()


@dataclass(frozen=True)
class UpdateResult:
    outcome: Outcome
    message: str
    manifest: Manifest
    entry: ModelEntry | None = None  # the staged model (Outcome.STAGED)


@dataclass
class _Progress:
    version: str = ""
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)


class Updater:
    """Checks a signed manifest, downloads and stages; the supervisor decides the switch."""

    def __init__(self, store: ModelStore, manifest_url: str, keys: Sequence[TrustedKey], *,
                 settings: UpdaterSettings | None = None, progress: ProgressFn | None = None,
                 on_state: Callable[[UpdateState, UpdateState, str], None] | None = None) -> None:
        self.store = store
        self.manifest_url = manifest_url
        self.keys = list(keys)
        self.settings = settings or UpdaterSettings()
        self._progress_cb = progress
        self.progress = _Progress()
        self.last_error: UpdateError | None = None
        self.last_check: float | None = None  # time.monotonic()
        self._state = StateCell(UpdateState.IDLE, logger=log, who="updater", on_change=on_state)

    @property
    def state(self) -> UpdateState:
        return self._state.value

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.done, self.progress.total = done, total
        if self._progress_cb:
            self._progress_cb(done, total)

    async def _fetch_manifest(self, session: aiohttp.ClientSession) -> bytes:
        url = self.manifest_url
        if urlparse(url).scheme not in ("http", "https"):
            path = urlparse(url).path if url.startswith("file:") else url
            try:
                with open(path, "rb") as f:
                    return f.read(MAX_MANIFEST_BYTES + 1)
            except OSError as exc:
                raise ManifestError(f"cannot read the manifest {path}: {exc.strerror or exc}",
                                    setting="[models] manifest_url", fix="is the USB stick mounted?") from exc
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=s.connect_timeout_s + s.read_timeout_s,
                                        connect=s.connect_timeout_s, sock_read=s.read_timeout_s)
        why = ""
        backoff = Backoff(first_s=s.backoff_s, max_s=s.backoff_max_s)
        for attempt in range(s.retries + 1):
            if attempt:
                await asyncio.sleep(backoff.next_delay())
            try:
                async with session.get(url, timeout=timeout) as resp:
                    if resp.status == 200:
                        return await _read_capped(resp.content, MAX_MANIFEST_BYTES + 1)
                    why = f"HTTP {resp.status} {resp.reason}"
                    if resp.status not in (404, 408, 429) and resp.status < 500:
                        break
            except (TimeoutError, aiohttp.ClientError) as exc:
                why = f"{type(exc).__name__} {exc}".strip()
        raise ManifestError(f"cannot fetch the manifest {url}: {why}", setting="[models] manifest_url",
                            fix="check the URL and the update server; the current model keeps serving")

    async def check_once(self) -> UpdateResult:
        """One check: returns what happened, or raises an UpdateError (also kept in last_error).

        Whatever the manifest or the store does, the state ends IDLE, STAGED or FAILED:
        an OSError from the store and any unexpected error become an UpdateError too.
        """
        self._state.set(UpdateState.CHECKING, self.manifest_url)
        self.last_check = time.monotonic()
        try:
            try:
                async with aiohttp.ClientSession() as session:
                    result = await self._check(session)
            except Exception as exc:  # nothing may leave the state CHECKING forever
                if isinstance(exc, UpdateError):
                    raise
                if isinstance(exc, OSError) and not isinstance(exc, TimeoutError | aiohttp.ClientError):
                    raise store_failure(exc, self.store.root) from exc
                log.exception("model update check of %s failed", self.manifest_url)
                raise UpdateError(f"checking {self.manifest_url} failed: {type(exc).__name__}: {exc}",
                                  setting="[models] manifest_url",
                                  fix="this is a bug: report it with `journalctl -u appliance`; "
                                      "the check is retried and the current model keeps serving") from exc
        except UpdateError as exc:
            self.last_error = exc
            self._state.set(UpdateState.FAILED, exc.operator_line(), level=logging.WARNING)
            raise
        self.last_error = None
        self._state.set(UpdateState.STAGED if result.outcome is Outcome.STAGED else UpdateState.IDLE,
                        result.message)
        return result

    async def _check(self, session: aiohttp.ClientSession) -> UpdateResult:
        raw = await self._fetch_manifest(session)
        m = parse_manifest(raw, self.keys, source=self.manifest_url)
        check_compatible(m)
        what = f"{m.name} {m.version}"
        reason = self.store.bad_reason(m.version)
        if reason is not None:
            return UpdateResult(Outcome.BAD, f"{what} is marked bad ({reason}); waiting for a new version", m)
        current = self.store.current()
        if current is not None and version_key(m.version) <= version_key(current.version):
            same = m.version == current.version
            return UpdateResult(Outcome.UP_TO_DATE if same else Outcome.OLDER,
                                f"{what} is current" if same
                                else f"{what} is older than the current {current.version}; ignored", m)
        staged = self.store.get(m.version)
        if staged is not None and staged.sha256 == m.sha256 and staged.state == "staged":
            return UpdateResult(Outcome.STAGED, f"{what} is staged", m, staged)
        await asyncio.to_thread(self.store.open)  # creates the layout, recovers from a power cut
        await asyncio.to_thread(self.store.drop_partials, keep_sha256=m.sha256)
        partial = self.store.partial_path(m.sha256)
        have = partial.stat().st_size if partial.exists() else 0
        need = max(m.size - have, 0) + self.settings.min_free_mb * 1024 * 1024
        free = self.store.free_bytes()
        if free < need:
            raise DiskFull(f"{self.store.root}: {what} needs {format_bytes(need)} free "
                           f"({format_bytes(m.size)} + {self.settings.min_free_mb} MiB margin), "
                           f"{format_bytes(free)} available",
                           fix=f"free space on the filesystem of {self.store.root}")
        source = resolve_url(self.manifest_url, m.url)
        self.progress = _Progress(version=m.version, done=have, total=m.size)
        self._state.set(UpdateState.DOWNLOADING, f"{what} from {source}")
        with open(partial.with_name(partial.name + ".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"{what} is being downloaded by another process") from None
            await download(source, partial, size=m.size, sha256=m.sha256, settings=self.settings,
                           session=session, progress=self._on_progress)
            self._state.set(UpdateState.VERIFYING, what)
            # fsync of a large model can take seconds on an SD card: never on the event loop
            entry = await asyncio.to_thread(self.store.stage, m, partial)
        Path(str(partial) + ".lock").unlink(missing_ok=True)
        return UpdateResult(Outcome.STAGED, f"{what} is staged", m, entry)

    # hooks for the supervisor ----------------------------------------------------------

    @contextlib.contextmanager
    def _storing(self) -> Iterator[None]:
        """A store step: an OSError becomes an UpdateError, and either one the FAILED state."""
        try:
            try:
                yield
            except OSError as exc:
                raise store_failure(exc, self.store.root) from exc
        except UpdateError as exc:
            self.last_error = exc
            self._state.set(UpdateState.FAILED, exc.operator_line(), level=logging.WARNING)
            raise

    def activate(self, version: str) -> ModelEntry:
        with self._storing():
            entry = self.store.activate(version)
        self._state.set(UpdateState.IDLE, f"{version} is current")
        return entry

    def mark_good(self, version: str) -> None:
        with self._storing():
            self.store.mark_good(version)

    def mark_bad(self, version: str, reason: str) -> ModelEntry | None:
        with self._storing():
            now = self.store.mark_bad(version, reason)
        self._state.set(UpdateState.IDLE, f"{version} is bad: {reason}", level=logging.WARNING)
        return now

    def rollback(self, reason: str = "rolled back by the operator") -> ModelEntry:
        return self.store.rollback(reason)

    def status(self) -> dict[str, Any]:
        """For ``appliance status`` (JSON-safe); a failing store is reported, never raised."""
        error = self.last_error
        try:
            current, previous = self.store.current(), self.store.previous()
            bad = sorted(e.version for e in self.store.list() if e.state == "bad")
        except OSError as exc:
            current, previous, bad = None, None, []
            error = error or store_failure(exc, self.store.root)
        p = self.progress
        return {
            "state": self.state.value,
            "reason": self._state.reason,
            "current": current.version if current else None,
            "confirmed": current.confirmed if current else None,
            "previous": previous.version if previous else None,
            "bad": bad,
            "download": {"version": p.version, "bytes": p.done, "total": p.total}
            if self.state is UpdateState.DOWNLOADING else None,
            "last_check_ago_s": round(time.monotonic() - self.last_check, 1) if self.last_check else None,
            "last_error": error.operator_line() if error else None,
        }


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Up to ``limit`` bytes, to the end of the body (``read(n)`` alone may stop at a packet)."""
    data = bytearray()
    while len(data) < limit and (chunk := await stream.read(limit - len(data))):
        data += chunk
    return bytes(data)


# -- policy ------------------------------------------------------------------------------


def parse_window(spec: str) -> tuple[dt.time, dt.time] | None:
    """``"02:00-05:00"`` (local time; may wrap midnight) → (start, end); ``""`` → None (always)."""
    if not spec.strip():
        return None
    try:
        start, end = (dt.time.fromisoformat(part.strip()) for part in spec.split("-"))
    except ValueError:
        raise ValueError(f"{spec!r} is not a window like \"02:00-05:00\"") from None
    if start == end:
        raise ValueError(f"{spec!r} is empty: start and end are the same")
    return start, end


def in_window(now: dt.datetime | dt.time, spec: str) -> bool:
    window = parse_window(spec)
    if window is None:
        return True
    t = now.time() if isinstance(now, dt.datetime) else now
    start, end = window
    return start <= t < end if start < end else (t >= start or t < end)


# -- CLI handlers (on the kiosk); they print and return an exit code -----------------------


def _print_error(exc: UpdateError) -> int:
    print(exc.operator_line(), file=sys.stderr)
    return 1


def cmd_models_list(state_dir: str = STATE_DIR, as_json: bool = False) -> int:
    entries = ModelStore(state_dir).list()
    if as_json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no models in {state_dir}")
        return 0
    print(f"{'STATE':9} {'NAME':20} {'VERSION':16} {'RUNTIME':9} {'SIZE':>10}  SHA256")
    for e in entries:
        state = e.state + ("" if e.state != "current" or e.confirmed else "*")
        print(f"{state:9} {e.name:20} {e.version:16} {e.runtime:9} {format_bytes(e.size):>10}  "
              f"{e.sha256[:12]}" + (f"  ({e.reason})" if e.reason else ""))
    if any(e.state == "current" and not e.confirmed for e in entries):
        print("* on trial: not yet confirmed by healthy frames")
    return 0


class _TtyBar:
    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        width = 30
        fill = int(width * done / total) if total else width
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {100 * done / max(total, 1):5.1f}% "
                         f"{format_bytes(done)} / {format_bytes(total)}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def cmd_models_update(state_dir: str, manifest_url: str, public_keys: Sequence[str], *,
                      keep_previous: int = 1, settings: UpdaterSettings | None = None,
                      activate: bool = False) -> int:
    """Check now, download and stage. With ``activate`` (daemon stopped) also switch."""
    if not manifest_url:
        print("[models] manifest_url is empty: nothing to update from", file=sys.stderr)
        return 1
    try:
        keys = [parse_public_key(k) for k in public_keys]
        store = ModelStore(state_dir, keep_previous=keep_previous)
        updater = Updater(store, manifest_url, keys, settings=settings,
                          progress=_TtyBar() if sys.stderr.isatty() else None)
        result = asyncio.run(updater.check_once())
        print(result.message)
        if result.outcome is Outcome.STAGED and activate:
            entry = updater.activate(result.manifest.version)
            print(f"{entry.name} {entry.version} is now current (on trial until it renders)")
        elif result.outcome is Outcome.STAGED:
            print("the running appliance warms it up and switches at its next check "
                  "(`systemctl reload appliance` to check now)")
    except UpdateError as exc:
        return _print_error(exc)
    return 0


def cmd_models_rollback(state_dir: str = STATE_DIR,
                        reason: str = "rolled back by the operator") -> int:
    try:
        entry = ModelStore(state_dir).rollback(reason)
    except UpdateError as exc:
        return _print_error(exc)
    print(f"{entry.name} {entry.version} is current again; the one it replaced is marked bad "
          "and will not be retried until a new version is published "
          "(`systemctl reload appliance` to switch the running avatar now)")
    return 0

