"""Signed model manifests: the format, ed25519 keys, signing, verification, publishing.

An update server (any static web server, or a USB stick) holds the model file and one
manifest that describes it. The kiosk trusts nothing in it until the signature checks
out against a public key from its config, and then trusts nothing beyond it: the model
is fetched only from the signed URL and read only up to the signed size, and must hash
to the signed sha256.

Manifest (``manifest.json``, UTF-8 JSON, format version 1)::

    {
      "format": "appliance-model-manifest",
      "format_version": 1,
      "name": "lobby-host",                 # [A-Za-z0-9][A-Za-z0-9._+-]{0,63}
      "version": "2024.06.01",              # same alphabet; compared part by part
      "runtime": "reference",               # "reference" (.json) or "bithuman" (.imx)
      "size": 18213,                        # bytes, integer
      "sha256": "9f86d0…",                  # 64 lowercase hex digits
      "url": "lobby-host-2024.06.01.json",  # http(s)://, file://, or relative to the manifest
      "min_appliance_version": "0.1.0",     # refused by older appliances
      "published_at": "2024-06-01T12:00:00Z",  # optional, informational
      "notes": "new shirt",                 # optional, informational
      "key_id": "3f1c9a0b5d7e2a46",         # first 16 hex digits of sha256(raw public key)
      "signature": "base64…"                # ed25519 over the canonical bytes
    }

The canonical bytes are the manifest without ``signature``, serialised as JSON with
sorted keys, no whitespace (separators ``,`` and ``:``), non-ASCII left as UTF-8::

    json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

``key_id`` is inside the signed bytes. Numbers are integers only (no floats), duplicate
keys and unknown keys are refused, and a manifest is at most 64 KiB and nested at most
``MAX_MANIFEST_DEPTH`` deep: both are checked before the JSON parser sees a byte, so
whatever a server or a USB stick serves, the answer is a ``ManifestError``.

Versions compare part by part after splitting on ``.``, ``-``, ``+`` and ``_``: numbers
numerically, words alphabetically, numbers above words, and a longer version above its
prefix: ``1.10 > 1.9.1 > 1.9 > 1.8``, but also ``1.9-rc1 > 1.9``, so use plain dotted
numbers or dates (``2024.06.01``, ``2024.06.01.2``), not pre-release suffixes. The kiosk only ever moves to a *higher* version than its current one,
so a replayed old manifest cannot downgrade it.

Keys: ``appliance models keygen DIR`` writes ``DIR/models-signing.key`` (PKCS#8 PEM,
mode 0600; keep it off the kiosks) and ``DIR/models-signing.pub`` (one line,
``ed25519:<base64 of the 32 raw bytes>``), which is what ``[models] public_key`` takes
(the line itself, or the path of the file).

Exception tree (every one has ``operator_line()``)::

    UpdateError                 a model update did not happen; the current model keeps serving
    ├── ManifestError           the manifest cannot be fetched, parsed, or is malformed
    │   └── SignatureError      unsigned, signed by an unknown key, or the signature is wrong
    ├── IncompatibleModel       needs a newer appliance, or an unknown runtime
    ├── DownloadError           the model could not be fetched (HTTP status, timeout, refused)
    │   └── SizeMismatch        the server sent more or fewer bytes than the signed size
    ├── VerifyError             the bytes do not hash to the signed sha256
    ├── DiskFull                not enough free space in the model store
    └── StoreError              the model store cannot do what was asked

``store_failure(OSError)`` turns what the filesystem says (EIO, ENOSPC, EACCES, EROFS)
into one of the last two, with the fix.
"""

from __future__ import annotations

import base64
import datetime as dt
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance import __version__
from appliance.errors import OperatorError

__all__ = [
    "MANIFEST_FORMAT",
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_DEPTH",
    "RUNTIME_EXTENSIONS",
    "Manifest",
    "TrustedKey",
    "UpdateError",
    "ManifestError",
    "SignatureError",
    "IncompatibleModel",
    "DownloadError",
    "SizeMismatch",
    "VerifyError",
    "DiskFull",
    "StoreError",
    "canonical_bytes",
    "check_compatible",
    "cmd_models_keygen",
    "cmd_models_publish",
    "cmd_models_sign",
    "generate_keypair",
    "key_id_of",
    "load_private_key",
    "manifest_bytes",
    "parse_manifest",
    "parse_public_key",
    "publish",
    "resolve_url",
    "sha256_file",
    "sign_manifest",
    "store_failure",
    "version_key",
]

MANIFEST_FORMAT = "appliance-model-manifest"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024
MAX_MANIFEST_DEPTH = 16  # a manifest is one flat object; deeper input never reaches json.loads
RUNTIME_EXTENSIONS = {"reference": ".json", "bithuman": ".imx"}
SETTING = "[models] manifest_url"
KEY_SETTING = "[models] public_key"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED: dict[str, type] = {
    "format": str, "format_version": int, "name": str, "version": str, "runtime": str,
    "size": int, "sha256": str, "url": str, "min_appliance_version": str, "key_id": str,
}
_OPTIONAL: dict[str, type] = {"published_at": str, "notes": str, "signature": str}


# -- errors ---------------------------------------------------------------------------


class UpdateError(OperatorError):
    """A model update did not happen. The message is one line an operator can act on."""


class ManifestError(UpdateError):
    pass


class SignatureError(ManifestError):
    pass


class IncompatibleModel(UpdateError):
    pass


class DownloadError(UpdateError):
    pass


class SizeMismatch(DownloadError):
    pass


class VerifyError(UpdateError):
    pass


class DiskFull(UpdateError):
    pass


class StoreError(UpdateError):
    pass


STORE_SETTING = "[models] directory"


def store_failure(exc: OSError, root: str | os.PathLike[str]) -> UpdateError:
    """What the filesystem of the model store said, as one line with the fix."""
    where = exc.filename or root
    what = f"model store {where}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(what, setting=STORE_SETTING, fix=f"free space on the filesystem of {root}")
    if exc.errno == errno.EIO:
        fix = "the disk or SD card reports read/write errors: check `journalctl -k`, replace it if they repeat"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = f"the daemon runs as user appliance: `chown -R appliance: {root}`"
    elif exc.errno == errno.EROFS:
        fix = "the filesystem went read-only (usually after disk errors): check `journalctl -k`, then reboot"
    else:
        fix = f"check {root} and its filesystem"
    return StoreError(what, setting=STORE_SETTING, fix=fix + "; the current model keeps serving")


# -- keys -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    key: Ed25519PublicKey

    def text(self) -> str:
        raw = self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "ed25519:" + base64.b64encode(raw).decode()


def key_id_of(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def parse_public_key(text: str) -> TrustedKey:
    """``ed25519:<base64>``, a PEM public key, or the path of a file holding either."""
    value = text.strip()
    bad = UpdateError(f"{value[:60]!r} is not an ed25519 public key", setting=KEY_SETTING,
                      fix="use the `ed25519:…` line from models-signing.pub (or its path)")
    if not value.startswith(("ed25519:", "-----BEGIN")) and os.path.isfile(value):
        value = Path(value).read_text().strip()
    try:
        if value.startswith("ed25519:"):
            raw = base64.b64decode(value[len("ed25519:"):], validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw)
        else:
            loaded = serialization.load_pem_public_key(value.encode())
            if not isinstance(loaded, Ed25519PublicKey):
                raise bad
            key = loaded
    except (ValueError, TypeError) as exc:
        raise bad from exc
    return TrustedKey(key_id_of(key), key)


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UpdateError(f"cannot read the signing key {path}: {exc}",
                          fix="make one with `appliance models keygen DIR`") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UpdateError(f"{path} is not an ed25519 private key",
                          fix="make one with `appliance models keygen DIR`")
    return key


def generate_keypair(directory: str | os.PathLike[str]) -> tuple[Path, Path, str]:
    """Write ``models-signing.key`` (0600) and ``.pub``; return (private, public, key_id)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / "models-signing.key", out / "models-signing.pub"
    if priv_path.exists():
        raise UpdateError(f"{priv_path} already exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    trusted = TrustedKey(key_id_of(key.public_key()), key.public_key())
    pub_path.write_text(trusted.text() + "\n")
    return priv_path, pub_path, trusted.key_id


# -- the manifest -----------------------------------------------------------------------


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key: parts split on . - + _; numbers numerically and above words."""
    parts = [p for p in re.split(r"[.\-+_]", version) if p]
    return tuple((1, int(p), "") if p.isdigit() else (0, 0, p) for p in parts)


def canonical_bytes(fields: Mapping[str, Any]) -> bytes:
    """The signed bytes: the manifest without ``signature``, canonical JSON, UTF-8."""
    body = {k: v for k, v in fields.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    runtime: str
    size: int
    sha256: str
    url: str  # as signed (maybe relative)
    min_appliance_version: str
    key_id: str
    fields: Mapping[str, Any]  # everything, as signed, including the signature

    @property
    def extension(self) -> str:
        return RUNTIME_EXTENSIONS[self.runtime]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_floats(text: str) -> Any:
    raise ValueError(f"number {text} is not an integer")


_NOT_A_MANIFEST_FIX = ("point [models] manifest_url at the manifest.json that `appliance models publish` "
                       "wrote; the current model keeps serving")


def _too_deep(text: str) -> int | None:
    """The line where [ or { nesting (outside strings) passes MAX_MANIFEST_DEPTH, else None.

    One linear pass (a regex for strings backtracks quadratically on crafted input).
    """
    depth, line, in_string, escaped = 0, 1, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_MANIFEST_DEPTH:
                return line
        elif char in "]}":
            depth -= 1
        if char == "\n":
            line += 1
    return None


def parse_manifest(raw: bytes, keys: Iterable[TrustedKey], *, source: str = "manifest") -> Manifest:
    """Parse and verify; the signature is checked before any field is believed.

    Size and nesting are bounded before parsing: any input gives a ManifestError.
    """
    def not_a_manifest(why: str) -> ManifestError:
        return ManifestError(f"{source} is not a manifest: {why}", setting=SETTING, fix=_NOT_A_MANIFEST_FIX)

    if len(raw) > MAX_MANIFEST_BYTES:
        raise not_a_manifest(f"larger than {MAX_MANIFEST_BYTES // 1024} KiB (a manifest is about 1 KiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_a_manifest(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    line = _too_deep(text)
    if line is not None:
        raise not_a_manifest(f"JSON nested more than {MAX_MANIFEST_DEPTH} levels deep (line {line}); "
                             "a manifest is one flat object")
    if not text.strip():
        raise not_a_manifest("the file is empty")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates,
                         parse_float=_no_floats, parse_constant=_no_floats)
    except json.JSONDecodeError as exc:  # it says where: "Expecting ',' delimiter: line 5 column 1"
        raise not_a_manifest(f"{exc} (truncated, or not JSON)") from None
    except ValueError as exc:  # a duplicate key, a float, a 5000-digit number
        raise not_a_manifest(str(exc)) from None
    if not isinstance(doc, dict):
        raise not_a_manifest(f"a JSON {type(doc).__name__}, not an object")
    signature, key_id = doc.get("signature"), doc.get("key_id")
    if not isinstance(signature, str) or not isinstance(key_id, str):
        raise SignatureError(f"{source} is not signed (no signature/key_id)", setting=SETTING,
                             fix="sign it with `appliance models sign`")
    trusted = {k.key_id: k for k in keys}
    if key_id not in trusted:
        raise SignatureError(
            f"{source} is signed by key {key_id}, which is not trusted "
            f"(trusted: {', '.join(sorted(trusted)) or 'none'})",
            setting=KEY_SETTING, fix="set [models] public_key to the publisher's models-signing.pub")
    try:
        trusted[key_id].key.verify(base64.b64decode(signature, validate=True), canonical_bytes(doc))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(f"{source}: the signature does not match its content (key {key_id})",
                             setting=SETTING,
                             fix="re-sign the manifest with `appliance models sign`; it was altered") from exc
    return _validate(doc, source)


def _validate(doc: dict[str, Any], source: str) -> Manifest:
    def bad(what: str) -> ManifestError:
        return ManifestError(f"{source}: {what}", setting=SETTING,
                             fix="publish it again with `appliance models publish`")

    unknown = set(doc) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise bad(f"unknown field(s) {', '.join(sorted(unknown))}")
    for key, typ in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in doc:
            if key in _REQUIRED:
                raise bad(f"missing field {key!r}")
            continue
        value = doc[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise bad(f"{key!r} must be a {typ.__name__}")
    if doc["format"] != MANIFEST_FORMAT or doc["format_version"] != FORMAT_VERSION:
        raise bad(f"format {doc['format']!r} v{doc['format_version']} is not "
                  f"{MANIFEST_FORMAT!r} v{FORMAT_VERSION}")
    for key in ("name", "version", "min_appliance_version"):
        if not _NAME_RE.match(doc[key]):
            raise bad(f"{key} {doc[key]!r} must match {_NAME_RE.pattern}")
    if not _SHA_RE.match(doc["sha256"]):
        raise bad("sha256 must be 64 lowercase hex digits")
    if doc["size"] <= 0:
        raise bad("size must be positive")
    scheme = urlparse(doc["url"]).scheme
    if scheme not in ("", "http", "https", "file"):
        raise bad(f"url scheme {scheme!r} is not http, https or file")
    return Manifest(name=doc["name"], version=doc["version"], runtime=doc["runtime"],
                    size=doc["size"], sha256=doc["sha256"], url=doc["url"],
                    min_appliance_version=doc["min_appliance_version"], key_id=doc["key_id"],
                    fields=dict(doc))


def check_compatible(manifest: Manifest, appliance_version: str = __version__) -> None:
    if manifest.runtime not in RUNTIME_EXTENSIONS:
        raise IncompatibleModel(
            f"model {manifest.name} {manifest.version} is for runtime {manifest.runtime!r}, "
            f"which this appliance does not have", fix="publish it for reference or bithuman")
    if version_key(manifest.min_appliance_version) > version_key(appliance_version):
        raise IncompatibleModel(
            f"model {manifest.name} {manifest.version} needs appliance "
            f"{manifest.min_appliance_version} or newer (this is {appliance_version})",
            fix="upgrade the appliance first")


def resolve_url(manifest_location: str, url: str) -> str:
    """The model's location: an http(s) URL or a local path, relative to the manifest."""
    base = urlparse(manifest_location)
    target = urlparse(url)
    if target.scheme in ("http", "https"):
        return url
    if target.scheme == "file":
        return target.path
    if base.scheme in ("http", "https"):
        return urljoin(manifest_location, url)
    base_path = base.path if base.scheme == "file" else manifest_location
    return str(Path(base_path).parent / url)


def sign_manifest(fields: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return the manifest with ``key_id`` and ``signature`` set (validated first)."""
    doc = {k: v for k, v in fields.items() if k != "signature"}
    doc["key_id"] = key_id_of(private_key.public_key())
    _validate(dict(doc, signature=""), "manifest")
    doc["signature"] = base64.b64encode(private_key.sign(canonical_bytes(doc))).decode()
    return doc


def manifest_bytes(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def publish(
    model_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    base_url: str,
    private_key: Ed25519PrivateKey,
    name: str,
    version: str,
    runtime: str,
    *,
    min_appliance_version: str = __version__,
    notes: str = "",
    manifest_name: str = "manifest.json",
) -> Path:
    """Copy the model into ``out_dir`` as ``<name>-<version><ext>`` and write a signed manifest.

    ``base_url`` is where ``out_dir`` will be served (empty: the URL is relative to the
    manifest, which suits USB sticks and any web server serving both side by side).
    Returns the manifest's path.
    """
    if runtime not in RUNTIME_EXTENSIONS:
        raise UpdateError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIME_EXTENSIONS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    filename = f"{name}-{version}{RUNTIME_EXTENSIONS[runtime]}"
    target = out / filename
    tmp = out / f".{filename}.tmp"
    shutil.copyfile(model_file, tmp)
    os.replace(tmp, target)
    fields: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "name": name,
        "version": version, "runtime": runtime, "size": target.stat().st_size,
        "sha256": sha256_file(target),
        "url": urljoin(base_url.rstrip("/") + "/", filename) if base_url else filename,
        "min_appliance_version": min_appliance_version,
        "published_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if notes:
        fields["notes"] = notes
    doc = sign_manifest(fields, private_key)
    manifest_path = out / manifest_name
    tmp = out / f".{manifest_name}.tmp"
    tmp.write_bytes(manifest_bytes(doc))
    os.replace(tmp, manifest_path)  # the manifest last: a server never serves one without its model
    return manifest_path


# -- CLI handlers (operator side); they print and return an exit code -----------------


def cmd_models_keygen(directory: str) -> int:
    try:
        priv, pub, key_id = generate_keypair(directory)
    except UpdateError as exc:
        print(exc.operator_line(), file=sys.stderr)
        return 1
    print(f"signing key {priv} (keep it secret, off the kiosks)\npublic key  {pub} (key id {key_id})\n"
          f"on each kiosk: [models] public_key = \"{pub.read_text().strip()}\"")
    return 0


def cmd_models_sign(manifest_path: str, key_path: str) -> int:
    """Sign (or re-sign) a manifest file in place."""
    try:
        doc = json.loads(Path(manifest_path).read_text(), object_pairs_hook=_no_duplicates)
        signed = sign_manifest(doc, load_private_key(key_path))
    except (OSError, ValueError) as exc:
        print(f"{manifest_path}: {exc}", file=sys.stderr)
        return 1
    except UpdateError as exc:
        print(exc.operator_line(), file=sys.stderr)
        return 1
    tmp = Path(manifest_path).with_name(Path(manifest_path).name + ".tmp")
    tmp.write_bytes(manifest_bytes(signed))
    os.replace(tmp, manifest_path)
    print(f"signed {manifest_path} with key {signed['key_id']}")
    return 0


def cmd_models_publish(model_file: str, out_dir: str, key_path: str, name: str, version: str,
                       runtime: str, base_url: str = "", min_appliance_version: str = __version__,
                       notes: str = "") -> int:
    try:
        path = publish(model_file, out_dir, base_url, load_private_key(key_path), name, version,
                       runtime, min_appliance_version=min_appliance_version, notes=notes)
    except OSError as exc:
        print(f"cannot publish: {exc}", file=sys.stderr)
        return 1
    except UpdateError as exc:
        print(exc.operator_line(), file=sys.stderr)
        return 1
    print(f"published {name} {version} ({runtime}): {path}")
    return 0
