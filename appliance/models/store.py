"""The on-disk model store: current, previous, staged and bad models, switched atomically.

The store (``/var/lib/appliance/models/``)::

    state.json             {"current": id, "previous": id, "kept": [ids], "confirmed": bool}
                           the one source of truth: one rename switches current and previous
    current, previous      symlinks to store/<id>, refreshed after state.json (convenience
                           for operators and for [avatar] model = ".../current/model.imx")
    bad.json               {version: {name, sha256, reason, at}}: never retried until the
                           version changes
    store/<id>/            model.json | model.imx + manifest.json; <id> = <name>-<version>;
                           a directory appears there complete (built in tmp/, fsynced, renamed)
    downloads/             <sha256>.partial + <sha256>.partial.json (resume state)
    tmp/                   half-built entries; emptied on open

Every durable step (fsync, rename, symlink) goes through ``FsOps`` so tests can cut the
power after any step: the store then opens with either the old or the new model
current, complete. Store methods re-read the disk each time and mutate under an
``flock`` on ``.lock``, so ``appliance models ...`` and the daemon can share a store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.models.manifest import (
    RUNTIME_EXTENSIONS,
    Manifest,
    StoreError,
    sha256_file,
    version_key,
)

__all__ = ["STATE_DIR", "FsOps", "ModelEntry", "ModelStore"]

log = logging.getLogger("appliance.models.store")

STATE_DIR = "/var/lib/appliance/models"


# -- durable filesystem steps ------------------------------------------------------------


class FsOps:
    """The durable steps of the store. ``step`` is called before each; tests override it."""

    def step(self, what: str) -> None:
        pass

    def fsync_file(self, path: Path) -> None:
        self.step(f"fsync {path.name}")
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        self.step(f"fsync dir {path.name}")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        self.step(f"rename {src.name} -> {dst.name}")
        os.replace(src, dst)

    def symlink(self, target: str, path: Path) -> None:
        self.step(f"symlink {path.name}")
        os.symlink(target, path)

    def rmtree(self, path: Path) -> None:
        self.step(f"remove {path.name}")
        shutil.rmtree(path, ignore_errors=True)

    def write_atomic(self, path: Path, data: bytes) -> None:
        """Temp file, fsync, rename over ``path``, fsync the directory."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        self.fsync_file(tmp)
        self.replace(tmp, path)
        self.fsync_dir(path.parent)


# -- the store -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    runtime: str
    size: int
    sha256: str
    state: str  # current | previous | kept | staged | bad
    path: str | None  # the model file; None for a bad version whose files are gone
    reason: str = ""  # why it is bad
    confirmed: bool = False  # current only: mark_good() was called since activate()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelStore:
    """Staged and active models under ``root``; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str] = STATE_DIR, *, keep_previous: int = 1,
                 ops: FsOps | None = None) -> None:
        self.root = Path(root)
        self.keep_previous = max(1, keep_previous)
        self.ops = ops or FsOps()
        self.store_dir = self.root / "store"
        self.downloads = self.root / "downloads"
        self.tmp = self.root / "tmp"

    # reading -------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.root / "state.json").read_text())
        except FileNotFoundError:
            doc = {}
        except (OSError, ValueError) as exc:  # never written non-atomically; say so loudly
            log.error("model store %s/state.json unreadable (%s); starting empty", self.root, exc)
            doc = {}
        state = {"current": doc.get("current"), "previous": doc.get("previous"),
                 "kept": list(doc.get("kept") or []), "confirmed": bool(doc.get("confirmed"))}
        present = {p.name for p in self.store_dir.iterdir()} if self.store_dir.is_dir() else set()
        state["kept"] = [i for i in state["kept"] if i in present]
        if state["previous"] not in present:
            state["previous"] = state["kept"].pop(0) if state["kept"] else None
        if state["current"] not in present:  # only by hand: fall back, never to nothing
            state["current"], state["confirmed"] = state["previous"], True
            state["previous"] = state["kept"].pop(0) if state["kept"] else None
        return state

    def _bad(self) -> dict[str, dict[str, Any]]:
        try:
            data: dict[str, dict[str, Any]] = json.loads((self.root / "bad.json").read_text())
            return data
        except (OSError, ValueError):
            return {}

    def _entry(self, ident: str, state: str, confirmed: bool = False) -> ModelEntry | None:
        try:
            doc = json.loads((self.store_dir / ident / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        ext = RUNTIME_EXTENSIONS.get(doc.get("runtime", ""), "")
        return ModelEntry(name=doc["name"], version=doc["version"], runtime=doc["runtime"],
                          size=doc["size"], sha256=doc["sha256"], state=state,
                          path=str(self.store_dir / ident / f"model{ext}"), confirmed=confirmed)

    def list(self) -> list[ModelEntry]:
        """Everything the store holds or refuses, newest version first."""
        state, bad = self._state(), self._bad()
        roles = {state["current"]: "current", state["previous"]: "previous",
                 **{i: "kept" for i in state["kept"]}}
        out: list[ModelEntry] = []
        idents = sorted(p.name for p in self.store_dir.iterdir()) if self.store_dir.is_dir() else []
        for ident in idents:
            role = roles.get(ident, "staged")
            entry = self._entry(ident, role, confirmed=role == "current" and state["confirmed"])
            if entry is None:
                continue
            if entry.version in bad:
                entry = ModelEntry(**{**entry.as_dict(), "reason": bad[entry.version]["reason"],
                                      "state": "bad" if role == "staged" else role})
            out.append(entry)
        shown = {e.version for e in out}
        for version, rec in bad.items():
            if version not in shown:
                out.append(ModelEntry(name=rec.get("name", ""), version=version,
                                      runtime=rec.get("runtime", ""), size=int(rec.get("size", 0)),
                                      sha256=rec.get("sha256", ""), state="bad", path=None,
                                      reason=rec["reason"]))
        return sorted(out, key=lambda e: version_key(e.version), reverse=True)

    def get(self, version: str) -> ModelEntry | None:
        return next((e for e in self.list() if e.version == version), None)

    def current(self) -> ModelEntry | None:
        return next((e for e in self.list() if e.state == "current"), None)

    def previous(self) -> ModelEntry | None:
        return next((e for e in self.list() if e.state == "previous"), None)

    def bad_reason(self, version: str) -> str | None:
        rec = self._bad().get(version)
        return rec["reason"] if rec else None

    def verify(self, version: str) -> bool:
        """Full check of a stored model: size and sha256 (reads the whole file)."""
        entry = self.get(version)
        if entry is None or entry.path is None or not os.path.isfile(entry.path):
            return False
        return os.path.getsize(entry.path) == entry.size and sha256_file(entry.path) == entry.sha256

    def partial_path(self, sha256: str) -> Path:
        return self.downloads / f"{sha256}.partial"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    # writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive (between processes too); creates the layout and recovers first."""
        for d in (self.root, self.store_dir, self.downloads, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._recover()
            yield

    def open(self) -> None:
        """Create the layout; finish or undo whatever a power cut interrupted."""
        with self._locked():
            pass

    def _recover(self) -> None:
        for leftover in self.tmp.iterdir():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        for leftover in self.root.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        self._sync_links(self._state())

    def _ident(self, version: str) -> str:
        for p in self.store_dir.iterdir() if self.store_dir.is_dir() else []:
            entry = self._entry(p.name, "staged")
            if entry is not None and entry.version == version:
                return p.name
        raise StoreError(f"model version {version} is not in the store {self.store_dir}",
                         fix="`appliance models list` shows what is there")

    def _write_state(self, state: dict[str, Any]) -> None:
        self.ops.write_atomic(self.root / "state.json", json.dumps(state, indent=1).encode())
        self._sync_links(state)

    def _sync_links(self, state: dict[str, Any]) -> None:
        for name in ("current", "previous"):
            link, ident = self.root / name, state[name]
            target = f"store/{ident}" if ident else None
            if (os.readlink(link) if link.is_symlink() else None) == target:
                continue
            if target is None:
                link.unlink(missing_ok=True)
            else:
                tmp = self.root / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
                self.ops.symlink(target, tmp)
                self.ops.replace(tmp, link)
            self.ops.fsync_dir(self.root)

    def stage(self, manifest: Manifest, payload: Path) -> ModelEntry:
        """Move a verified download into the store (complete, or not at all)."""
        with self._locked():
            ident = f"{manifest.name}-{manifest.version}"
            final = self.store_dir / ident
            if final.exists():
                existing = self._entry(ident, "staged")
                if existing is not None and existing.sha256 == manifest.sha256:
                    payload.unlink(missing_ok=True)
                    return self.get(manifest.version) or existing
                state = self._state()
                if ident in (state["current"], state["previous"], *state["kept"]):
                    raise StoreError(f"{manifest.name} {manifest.version} is in use with other "
                                     "content; publish the new content under a new version")
                self.ops.rmtree(final)
            build = self.tmp / f"{ident}.{uuid.uuid4().hex[:8]}"
            build.mkdir()
            model = build / f"model{manifest.extension}"
            self.ops.replace(payload, model)
            (build / "manifest.json").write_text(json.dumps(dict(manifest.fields), indent=2))
            self.ops.fsync_file(model)
            self.ops.fsync_file(build / "manifest.json")
            self.ops.fsync_dir(build)
            self.ops.replace(build, final)
            self.ops.fsync_dir(self.store_dir)
            payload.with_name(payload.name + ".json").unlink(missing_ok=True)
            log.info("staged model %s %s", manifest.name, manifest.version,
                     extra={"model": manifest.version})
        entry = self.get(manifest.version)
        assert entry is not None
        return entry

    def activate(self, version: str) -> ModelEntry:
        """Make ``version`` current (on trial until mark_good); the old current becomes previous."""
        with self._locked():
            ident, state = self._ident(version), self._state()
            if state["current"] == ident:
                entry = self.current()
                assert entry is not None
                return entry
            order = [state["current"], state["previous"], *state["kept"]]
            older = [i for i in order if i and i != ident][: self.keep_previous]
            self._write_state({"current": ident, "previous": older[0] if older else None,
                               "kept": older[1:], "confirmed": False})
            log.info("model %s is now current", version, extra={"model": version})
            self._prune()
        entry = self.current()
        assert entry is not None
        return entry

    def mark_good(self, version: str) -> None:
        with self._locked():
            state = self._state()
            if state["current"] == self._ident(version) and not state["confirmed"]:
                self._write_state({**state, "confirmed": True})

    def mark_bad(self, version: str, reason: str) -> ModelEntry | None:
        """Never retry this version. If it is current, roll back to previous.

        Returns the model that should be serving now (None: the store has none).
        """
        with self._locked():
            entry = self.get(version)
            bad = self._bad()
            bad[version] = {"name": entry.name if entry else "", "runtime": entry.runtime if entry else "",
                            "size": entry.size if entry else 0,
                            "sha256": entry.sha256 if entry else "", "reason": reason,
                            "at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
            self.ops.write_atomic(self.root / "bad.json", json.dumps(bad, indent=1).encode())
            log.warning("model %s marked bad: %s", version, reason, extra={"model": version, "reason": reason})
            state = self._state()
            if entry is not None and entry.state == "current":
                # back to the previous model; with none, to no current at all, so that the
                # configured [avatar] model (what served before the store had one) serves again
                self._write_state({"current": state["previous"],
                                   "previous": state["kept"][0] if state["kept"] else None,
                                   "kept": state["kept"][1:], "confirmed": True})
            self._prune()
        return self.current()

    def rollback(self, reason: str = "rolled back by the operator") -> ModelEntry:
        """Go back to the previous model; the current one is marked bad (with ``reason``)."""
        current, previous = self.current(), self.previous()
        if current is None or previous is None:
            raise StoreError(f"nothing to roll back to in {self.root}: "
                             f"{'no current model' if current is None else 'no previous model'}")
        now = self.mark_bad(current.version, reason)
        assert now is not None
        return now

    def _prune(self) -> None:
        """Delete what is neither pointed to nor a staged candidate newer than current."""
        state, bad = self._state(), self._bad()
        keep = {state["current"], state["previous"], *state["kept"]}
        current = self._entry(state["current"], "current") if state["current"] else None
        for p in list(self.store_dir.iterdir()):
            if p.name in keep:
                continue
            entry = self._entry(p.name, "staged")
            newer = entry is not None and (current is None or
                                           version_key(entry.version) > version_key(current.version))
            if entry is None or entry.version in bad or not newer:
                self.ops.rmtree(p)

    def drop_partials(self, keep_sha256: str = "") -> None:
        for p in self.downloads.iterdir() if self.downloads.is_dir() else []:
            if not keep_sha256 or not p.name.startswith(keep_sha256):
                p.unlink(missing_ok=True)

