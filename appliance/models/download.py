"""The resumable, verifying model downloader.

``download()`` fetches exactly the number of bytes a signed manifest promised,
from http(s) (with ``Range`` resume after an interruption or a restart: the
``.partial`` file keeps a small JSON sidecar saying what it is) or from a local
path (USB installs), in bounded chunks, then checks the sha256. It never reads
past the signed size and never trusts the server's idea of the length.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp

from appliance.models.manifest import (
    DiskFull,
    DownloadError,
    SizeMismatch,
    UpdateError,
    VerifyError,
    sha256_file,
    store_failure,
)
from appliance.retry import Backoff

__all__ = ["UpdaterSettings", "download", "format_bytes"]

log = logging.getLogger("appliance.models.download")

ProgressFn = Callable[[int, int], None]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(frozen=True)
class UpdaterSettings:
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0  # no byte for this long: the attempt fails (then resumes)
    retries: int = 3  # extra attempts per check, with backoff, resuming where it stopped
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    min_free_mb: int = 64  # margin left free on the store's filesystem
    chunk_kib: int = 256


class _Retry(Exception):
    """A transient failure: try again (resuming)."""


def _sidecar(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


async def download(source: str, partial: Path, *, size: int, sha256: str,
                   settings: UpdaterSettings, session: aiohttp.ClientSession | None = None,
                   progress: ProgressFn | None = None) -> None:
    """Fetch exactly ``size`` bytes from ``source`` into ``partial``, resuming, then verify.

    Never reads past ``size``; SizeMismatch when the source has more or fewer bytes,
    VerifyError when the bytes do not hash to ``sha256`` (the partial is then deleted).
    """
    meta = {"sha256": sha256, "size": size}
    try:
        state = json.loads(_sidecar(partial).read_text())
    except (OSError, ValueError):
        state = {}
    if {k: state.get(k) for k in meta} != meta or not partial.exists():
        partial.unlink(missing_ok=True)
        partial.touch()
        _sidecar(partial).write_text(json.dumps(meta))
        state = dict(meta)
    if partial.stat().st_size > size:
        os.truncate(partial, 0)
    attempt = 0
    backoff = Backoff(first_s=settings.backoff_s, max_s=settings.backoff_max_s)
    while partial.stat().st_size < size:
        try:
            if urlparse(source).scheme in ("http", "https"):
                assert session is not None
                await _fetch_http(session, source, partial, size, state, settings, progress)
            else:
                await _copy_local(source, partial, size, settings, progress)
        except _Retry as exc:
            attempt += 1
            if attempt > settings.retries:
                raise DownloadError(f"{source}: {exc} (gave up after {attempt} attempts; "
                                    f"{partial.stat().st_size} of {size} bytes kept for resuming)",
                                    setting="[models] manifest_url",
                                    fix="check the update server; the next check resumes") from None
            delay = backoff.next_delay()
            log.warning("model download: %s; retrying in %.0f s", exc, delay)
            await asyncio.sleep(delay)
        except SizeMismatch:
            partial.unlink(missing_ok=True)
            _sidecar(partial).unlink(missing_ok=True)
            raise
        except OSError as exc:
            raise _disk_error(exc, partial, size) from exc
    if progress:
        progress(size, size)
    digest = await asyncio.to_thread(sha256_file, partial)
    if digest != sha256:
        partial.unlink(missing_ok=True)
        _sidecar(partial).unlink(missing_ok=True)
        raise VerifyError(f"{source}: sha256 {digest[:16]}… does not match the signed "
                          f"{sha256[:16]}…; the file is corrupt or was replaced",
                          fix="publish the model again; the download was discarded")


def _disk_error(exc: OSError, partial: Path, size: int) -> UpdateError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        partial.unlink(missing_ok=True)
        return DiskFull(f"{partial.parent}: the disk filled up while downloading a "
                        f"{format_bytes(size)} model", fix="free space on that filesystem")
    return store_failure(exc, partial.parent.parent)


async def _fetch_http(session: aiohttp.ClientSession, url: str, partial: Path, size: int,
                      state: dict[str, Any], settings: UpdaterSettings,
                      progress: ProgressFn | None) -> None:
    offset = partial.stat().st_size
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    if offset and state.get("validator"):
        headers["If-Range"] = state["validator"]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s,
                                    connect=settings.connect_timeout_s,
                                    sock_read=settings.read_timeout_s)
    try:
        async with session.get(url, headers=headers, timeout=timeout) as resp:
            if resp.status == 416:
                total = resp.headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit() and int(total) != size:
                    raise SizeMismatch(f"{url}: the server has {total} bytes, the signed size is {size}")
                os.truncate(partial, 0)
                raise _Retry("the server refused to resume; starting again")
            if resp.status in (404, 408, 429) or resp.status >= 500:
                raise _Retry(f"HTTP {resp.status} {resp.reason}")
            if resp.status not in (200, 206):
                raise DownloadError(f"{url}: HTTP {resp.status} {resp.reason}",
                                    fix="check the URL and the server's permissions")
            if resp.status == 206:
                start, _, total = resp.headers.get("Content-Range", "").partition(" ")[2].partition("-")
                total = total.rpartition("/")[2]
                if total.isdigit() and int(total) != size:
                    raise SizeMismatch(f"{url}: the server has {total} bytes, the signed size is {size}")
                if not start.isdigit() or int(start) != offset:
                    os.truncate(partial, 0)
                    raise _Retry(f"the server resumed at {start!r}, not {offset}; starting again")
            else:
                if offset:
                    log.info("model download: %s ignored the Range request; starting again", url)
                offset = 0
                os.truncate(partial, 0)
            length = resp.content_length
            if length is not None and offset + length != size:
                raise SizeMismatch(f"{url}: the server sends {offset + length} bytes, "
                                   f"the signed size is {size}",
                                   fix="publish the model and manifest again, together")
            validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
            if validator and validator != state.get("validator"):
                state["validator"] = validator
                _sidecar(partial).write_text(json.dumps(state))
            remaining = size - offset
            with open(partial, "ab", buffering=0) as f:
                async for chunk in resp.content.iter_chunked(settings.chunk_kib * 1024):
                    if len(chunk) > remaining:
                        raise SizeMismatch(f"{url}: the server sent more than the signed {size} bytes",
                                           fix="publish the model and manifest again, together")
                    f.write(chunk)
                    remaining -= len(chunk)
                    if progress:
                        progress(size - remaining, size)
                    if remaining == 0:
                        if await resp.content.read(1):
                            raise SizeMismatch(f"{url}: the server sent more than the signed {size} bytes",
                                               fix="publish the model and manifest again, together")
                        break
            if remaining:
                raise _Retry(f"the connection ended after {size - remaining} of {size} bytes")
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _Retry(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None


async def _copy_local(path: str, partial: Path, size: int, settings: UpdaterSettings,
                      progress: ProgressFn | None) -> None:
    try:
        src = open(path, "rb")
    except OSError as exc:
        raise DownloadError(f"cannot read {path}: {exc.strerror or exc}",
                            fix="is the USB stick mounted?") from exc
    with src, open(partial, "ab", buffering=0) as dst:
        offset = partial.stat().st_size
        src.seek(offset)
        remaining = size - offset
        while remaining:
            chunk = await asyncio.to_thread(src.read, min(remaining, settings.chunk_kib * 1024))
            if not chunk:
                raise SizeMismatch(f"{path} has {size - remaining} bytes, the signed size is {size}")
            dst.write(chunk)
            remaining -= len(chunk)
            if progress:
                progress(size - remaining, size)
        if src.read(1):
            raise SizeMismatch(f"{path} is larger than the signed {size} bytes")
