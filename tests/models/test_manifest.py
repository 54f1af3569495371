"""Signed model manifests: keys, canonical bytes, signature checks, publishing."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import __version__
from appliance.models.manifest import (
    IncompatibleModel,
    ManifestError,
    SignatureError,
    TrustedKey,
    UpdateError,
    canonical_bytes,
    check_compatible,
    cmd_models_keygen,
    cmd_models_publish,
    cmd_models_sign,
    generate_keypair,
    key_id_of,
    load_private_key,
    parse_manifest,
    parse_public_key,
    publish,
    resolve_url,
    sha256_file,
    sign_manifest,
    version_key,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
TRUSTED = TrustedKey(key_id_of(KEY.public_key()), KEY.public_key())


def fields(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format": "appliance-model-manifest", "format_version": 1, "name": "lobby",
        "version": "2.0", "runtime": "reference", "size": 1234, "sha256": "ab" * 32,
        "url": "lobby-2.0.json", "min_appliance_version": "0.1.0",
    }
    base.update(over)
    return base


def raw(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def test_canonical_bytes_are_sorted_compact_utf8_without_signature() -> None:
    assert canonical_bytes({"b": 1, "a": "é", "signature": "x"}) == '{"a":"é","b":1}'.encode()


def test_sign_and_verify_round_trip() -> None:
    doc = sign_manifest(fields(), KEY)
    assert doc["key_id"] == TRUSTED.key_id and len(TRUSTED.key_id) == 16
    m = parse_manifest(raw(doc), [TRUSTED])
    assert (m.name, m.version, m.size, m.runtime, m.extension) == ("lobby", "2.0", 1234, "reference", ".json")
    # the signature is over the canonical bytes, whatever the serialisation on the wire
    assert parse_manifest(json.dumps(doc, indent=4, sort_keys=False).encode(), [TRUSTED]).sha256 == "ab" * 32


@pytest.mark.parametrize("field,value", [
    ("size", 1235), ("sha256", "cd" * 32), ("url", "http://evil.example/x.json"),
    ("version", "2.1"), ("runtime", "bithuman"), ("min_appliance_version", "0.0.1"),
    ("key_id", "0" * 16),
])
def test_any_change_after_signing_is_refused(field: str, value: Any) -> None:
    doc = sign_manifest(fields(), KEY)
    doc[field] = value
    with pytest.raises(SignatureError):
        parse_manifest(raw(doc), [TRUSTED])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_property_flipping_any_signature_bit_is_refused(data: st.DataObject) -> None:
    doc = sign_manifest(fields(), KEY)
    sig = bytearray(base64.b64decode(doc["signature"]))
    bit = data.draw(st.integers(0, len(sig) * 8 - 1))
    sig[bit // 8] ^= 1 << (bit % 8)
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(SignatureError):
        parse_manifest(raw(doc), [TRUSTED])


def test_unsigned_and_untrusted_manifests_are_refused() -> None:
    with pytest.raises(SignatureError, match="not signed"):
        parse_manifest(raw(fields()), [TRUSTED])
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match="not trusted") as exc:
        parse_manifest(raw(sign_manifest(fields(), other)), [TRUSTED])
    assert "[models] public_key" in exc.value.operator_line()
    # several trusted keys (key rotation): either verifies
    second = TrustedKey(key_id_of(other.public_key()), other.public_key())
    assert parse_manifest(raw(sign_manifest(fields(), other)), [TRUSTED, second]).name == "lobby"


def _signed_raw_text(text: str) -> bytes:
    """Sign an arbitrary JSON text's parsed content without sign_manifest's validation."""
    doc = json.loads(text)
    doc["key_id"] = TRUSTED.key_id
    doc["signature"] = base64.b64encode(KEY.sign(canonical_bytes(doc))).decode()
    return json.dumps(doc).encode()


@pytest.mark.parametrize("doc,match", [
    (fields(extra="x"), "unknown field"),
    (fields(size="1234"), "'size' must be a int"),
    (fields(size=True), "'size' must be a int"),
    (fields(size=0), "size must be positive"),
    (fields(sha256="AB" * 32), "sha256"),
    (fields(name="../etc"), "name"),
    (fields(version="1 0"), "version"),
    (fields(url="ftp://x/y"), "scheme"),
    (fields(format="other"), "format"),
    ({k: v for k, v in fields().items() if k != "url"}, "missing field 'url'"),
])
def test_malformed_signed_manifests_are_refused(doc: dict[str, Any], match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        parse_manifest(_signed_raw_text(json.dumps(doc)), [TRUSTED])


def test_floats_duplicates_and_garbage_are_refused() -> None:
    signed = json.dumps(sign_manifest(fields(), KEY))
    with pytest.raises(ManifestError, match="duplicate"):
        parse_manifest(signed.replace('"size": 1234', '"size": 1234, "size": 99').encode(), [TRUSTED])
    with pytest.raises(ManifestError, match="integer"):
        parse_manifest(signed.replace('"size": 1234', '"size": 1234.0').encode(), [TRUSTED])
    with pytest.raises(ManifestError):
        parse_manifest(b"\xff\xfe not json", [TRUSTED])
    with pytest.raises(ManifestError, match="larger"):
        parse_manifest(b" " * 70000, [TRUSTED])


def test_version_order() -> None:
    ordered = ["0.9", "1", "1.0", "1.2", "1.10", "2024.06.01", "2024.06.01.2", "2024.12.01"]
    assert sorted(ordered, key=version_key) == ordered
    assert version_key("1-2") == version_key("1.2")


def test_check_compatible() -> None:
    ok = parse_manifest(raw(sign_manifest(fields(), KEY)), [TRUSTED])
    check_compatible(ok)
    future = parse_manifest(raw(sign_manifest(fields(min_appliance_version="99.0"), KEY)), [TRUSTED])
    with pytest.raises(IncompatibleModel, match=f"needs appliance 99.0 or newer \\(this is {__version__}\\)"):
        check_compatible(future)
    other = parse_manifest(raw(sign_manifest(fields(runtime="gpu"), KEY)), [TRUSTED])
    with pytest.raises(IncompatibleModel, match="runtime 'gpu'"):
        check_compatible(other)


def test_resolve_url() -> None:
    assert resolve_url("https://u.example/a/manifest.json", "m.imx") == "https://u.example/a/m.imx"
    assert resolve_url("https://u.example/a/manifest.json", "http://cdn/m.imx") == "http://cdn/m.imx"
    assert resolve_url("/media/usb/manifest.json", "m.imx") == "/media/usb/m.imx"
    assert resolve_url("file:///media/usb/manifest.json", "m.imx") == "/media/usb/m.imx"
    assert resolve_url("/media/usb/manifest.json", "file:///srv/m.imx") == "/srv/m.imx"


def test_keys_files_and_formats(tmp_path: Path) -> None:
    priv, pub, key_id = generate_keypair(tmp_path / "keys")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    text = pub.read_text().strip()
    assert text.startswith("ed25519:")
    assert parse_public_key(text).key_id == key_id
    assert parse_public_key(str(pub)).key_id == key_id
    key = load_private_key(priv)
    assert key_id_of(key.public_key()) == key_id
    with pytest.raises(UpdateError, match="already exists"):
        generate_keypair(tmp_path / "keys")
    with pytest.raises(UpdateError, match="not an ed25519 public key"):
        parse_public_key("ed25519:AAAA")
    with pytest.raises(UpdateError) as exc:
        load_private_key(pub)
    assert "cannot read the signing key" in str(exc.value) and "keygen" in exc.value.operator_line()


def test_publish_writes_model_and_signed_manifest(tmp_path: Path) -> None:
    model = tmp_path / "in.imx"
    model.write_bytes(b"\x00imx" * 1000)
    path = publish(model, tmp_path / "out", "https://updates.example/lobby/", KEY, "lobby", "3",
                   "bithuman", notes="new")
    m = parse_manifest(path.read_bytes(), [TRUSTED])
    assert m.url == "https://updates.example/lobby/lobby-3.imx"
    assert m.size == 4000 and m.sha256 == sha256_file(tmp_path / "out" / "lobby-3.imx")
    assert m.fields["notes"] == "new" and m.min_appliance_version == __version__
    relative = publish(model, tmp_path / "usb", "", KEY, "lobby", "3", "bithuman")
    assert parse_manifest(relative.read_bytes(), [TRUSTED]).url == "lobby-3.imx"


def test_cli_handlers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_models_keygen(str(tmp_path / "k")) == 0
    assert "public_key = \"ed25519:" in capsys.readouterr().out
    assert cmd_models_keygen(str(tmp_path / "k")) == 1
    key_path = str(tmp_path / "k" / "models-signing.key")
    model = tmp_path / "a.json"
    model.write_text("{}")
    assert cmd_models_publish(str(model), str(tmp_path / "srv"), key_path, "a", "1", "reference") == 0
    assert cmd_models_publish(str(model), str(tmp_path / "srv"), key_path, "a", "1", "gpu") == 1
    # hand-edit, then re-sign
    manifest = tmp_path / "srv" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["notes"] = "edited"
    manifest.write_text(json.dumps(doc))
    pub = parse_public_key(str(tmp_path / "k" / "models-signing.pub"))
    with pytest.raises(SignatureError):
        parse_manifest(manifest.read_bytes(), [pub])
    assert cmd_models_sign(str(manifest), key_path) == 0
    assert parse_manifest(manifest.read_bytes(), [pub]).fields["notes"] == "edited"
    assert cmd_models_sign(str(tmp_path / "nope.json"), key_path) == 1


# -- whatever the bytes, a ManifestError (never RecursionError, never a hang) ---------------


@pytest.mark.parametrize("raw,says", [
    (b"[" * 60_000, "nested more than 16 levels deep (line 1)"),
    (b"\n\n" + b'{"a":' * 5_000, "nested more than 16 levels deep (line 3)"),
    (b" " * (64 * 1024 + 1), "larger than 64 KiB"),
    (b"", "the file is empty"),
    (b"\xff\xfe{}", "not UTF-8 text (byte 0xff at offset 0)"),
    (b'{"format": "appliance-model-manifest", "na', "(truncated, or not JSON)"),
    (b'"just a string"', "a JSON str, not an object"),
])
def test_malformed_manifest_is_refused_before_or_by_the_parser(raw: bytes, says: str) -> None:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(raw, [TRUSTED], source="https://updates.example/manifest.json")
    line = exc.value.operator_line()
    assert line.startswith("[models] manifest_url: https://updates.example/manifest.json is not a manifest: ")
    assert says in line and "— point [models] manifest_url at the manifest.json" in line


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    doc = sign_manifest(fields(notes='[[[[{{{{"\\\\' * 10), KEY)
    assert parse_manifest(raw(doc), [TRUSTED]).fields["notes"].startswith("[[[[{{{{")


def test_crafted_input_is_checked_in_linear_time() -> None:
    import time

    for crafted in (b'"' + b'\\"' * 30_000, b'["' * 30_000, b"[" * 16 + b'"\\' * 30_000):
        start = time.monotonic()
        with pytest.raises(ManifestError):
            parse_manifest(crafted, [TRUSTED])
        took = time.monotonic() - start
        print(f"\n{len(crafted)} crafted bytes refused in {took * 1000:.1f} ms")
        assert took < 2.0  # generous: quadratic scanning of this input took ~5 s


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048) | st.text(alphabet='[]{}":,\\ 0a', max_size=4096).map(str.encode))
def test_property_any_bytes_give_a_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(data, [TRUSTED])
