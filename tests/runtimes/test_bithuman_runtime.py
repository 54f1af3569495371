"""The bithuman runtime against the real SDK's error paths, with nothing leaving loopback.

Every scenario runs in a fresh child process (the SDK's native auth is process-wide
state and reads its environment once) whose environment sends all HTTPS through a
proxy on 127.0.0.1: libcurl inside the SDK and Python's urllib both honour
``https_proxy``.  When this process may create namespaces (root + ``unshare``), the
child also runs in a private network namespace that has only loopback, so nothing
can reach the internet even if some code ignored the proxy.

The SDK always authenticates against https://api.bithuman.ai (it ignores an
``api_url`` that is not an https bitHuman host), so "account refused" is tested with
a proxy on loopback that terminates TLS itself with a throw-away certificate the
child trusts through ``CURL_CA_BUNDLE`` and answers 401/402/403/500.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

bithuman = pytest.importorskip("bithuman")

from appliance.runtimes import (  # noqa: E402
    CredentialMissing,
    CredentialRefused,
    ModelInvalid,
    ModelMissing,
    ServiceUnreachable,
    VideoSpec,
    create_runtime,
)
from appliance.runtimes.bithuman import BithumanRuntime, convert_frame, map_sdk_error  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-test-not-a-real-secret"

# A CONNECT proxy for loopback that terminates TLS itself and answers every request with
# STATUS.  It must be its own process: the SDK's native auth holds the GIL while it waits
# for the answer, so a proxy thread inside the SDK's process would never get to run.
PROXY = r"""
import datetime, os, socket, ssl, sys, tempfile, threading
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
status, body = int(sys.argv[1]), sys.argv[2].encode()
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.bithuman.ai")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("api.bithuman.ai")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
d = tempfile.mkdtemp()
cpath, kpath = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
with open(cpath, "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
with open(kpath, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cpath, kpath)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
print(srv.getsockname()[1], cpath, flush=True)
def handle(s):
    try:
        f = s.makefile("rb")
        print("SAW", f.readline().decode().strip(), flush=True)
        while f.readline() not in (b"\r\n", b""):
            pass
        s.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        t = ctx.wrap_socket(s, server_side=True)
        tf = t.makefile("rb")
        print("SAW", tf.readline().decode().strip(), flush=True)
        n = 0
        while (line := tf.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            if k.strip().lower() == "content-length":
                n = int(v)
        tf.read(n)
        t.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                  b"Connection: close\r\n\r\n" % (status, len(body)) + body)
        t.close()
    except Exception as e:
        print("SAW proxy error", repr(e), flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

# The child: points all HTTP(S) at a loopback proxy (closed port, or PROXY answering
# STATUS), opens the runtime, prints the result as one JSON line.
CHILD = r"""
import asyncio, json, os, socket, subprocess, sys
cfg = json.loads(sys.argv[1])
proxy, port, helper = cfg.get("proxy", "closed"), None, None
if proxy == "closed":
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
elif proxy != "none":
    helper = subprocess.Popen([sys.executable, "-c", cfg["proxy_src"], proxy, cfg.get("body", '{"error":"refused"}')],
                              stdout=subprocess.PIPE, text=True)
    port, cafile = helper.stdout.readline().split()
    os.environ["CURL_CA_BUNDLE"] = cafile
if port is not None:
    for k in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ[k] = f"http://127.0.0.1:{port}"

from appliance.runtimes.bithuman import BithumanRuntime
from appliance.runtimes import RuntimeFailure

async def main():
    rt = BithumanRuntime(api_secret=cfg.get("secret"), precheck=cfg.get("precheck", True))
    try:
        await rt.open(cfg["model"])
        await rt.close()
        return {"ok": True}
    except RuntimeFailure as e:
        c = e.__cause__
        return {"type": type(e).__name__, "message": str(e), "setting": e.setting, "fix": e.fix,
                "line": e.operator_line(), "cause": type(c).__name__ if c else None,
                "cause_text": str(c) if c else None}

out = asyncio.run(main())
out["proxy_saw"] = []
if helper is not None:
    helper.kill()
    out["proxy_saw"] = [ln[4:].strip() for ln in helper.stdout.read().splitlines() if ln.startswith("SAW ")]
print("RESULT " + json.dumps(out), flush=True)
"""


def _netns_prefix() -> list[str]:
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
    return []


NETNS = _netns_prefix()


def run_child(tmp_path: Path, **cfg: Any) -> dict[str, Any]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(
            ("BITHUMAN_", "NO_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "CURL_", "SSL_CERT")
        )
    }
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        PYTHONPATH=str(REPO),
        BITHUMAN_METER_STATE_DIR=str(home / "meter"),
        BITHUMAN_USAGE_STATE_DIR=str(home / "usage"),
    )
    cfg.setdefault("proxy_src", PROXY)
    proc = subprocess.run(
        [*NETNS, sys.executable, "-c", CHILD, json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=str(tmp_path),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    assert SECRET not in json.dumps(result)  # the secret never reaches an operator line
    return result


def make_imx(
    path: Path, manifest: dict[str, Any] | None, entries: tuple[tuple[str, bytes], ...] = ()
) -> Path:
    """An IMX container as the SDK reads it (bithuman/_imx_engine.py read_manifest):
    b"IMX\\0", u16 version, u16 count, then per entry u16 name length, name, u64 offset,
    u64 size; here with a manifest and no weights."""
    items = (
        [("manifest.json", json.dumps(manifest).encode())] if manifest is not None else []
    ) + list(entries)
    header = struct.pack("<4sHH", b"IMX\x00", 2, len(items))
    offset = len(header) + sum(2 + len(n.encode()) + 16 for n, _ in items)
    toc, body = b"", b""
    for name, data in items:
        toc += (
            struct.pack("<H", len(name.encode()))
            + name.encode()
            + struct.pack("<QQ", offset + len(body), len(data))
        )
        body += data
    path.write_bytes(header + toc + body)
    return path


@pytest.fixture
def essence1_imx(tmp_path: Path) -> Path:
    imx = make_imx(
        tmp_path / "manifest-only.imx", {"model_type": "essence", "name": "not a real avatar"}
    )
    from bithuman._imx_engine import engine_id_for_path

    assert engine_id_for_path(str(imx)) == "essence1"  # the SDK reads our container
    return imx


def test_factory_makes_it() -> None:
    assert isinstance(create_runtime("bithuman", api_secret="x"), BithumanRuntime)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "avatar.imx"
    for precheck in (True, False):  # ours, then the SDK's own ModelNotFoundError
        r = run_child(tmp_path, model=str(missing), secret=SECRET, precheck=precheck)
        assert r["type"] == "ModelMissing" and str(missing) in r["message"], r
        assert r["setting"] == "[avatar] model"
        if not precheck:
            assert r["cause"] == "ModelNotFoundError"


def test_no_secret(tmp_path: Path, essence1_imx: Path) -> None:
    for precheck in (True, False):  # ours, then the SDK's BithumanError "api_secret is required"
        r = run_child(tmp_path, model=str(essence1_imx), secret=None, precheck=precheck)
        assert r["type"] == "CredentialMissing", r
        assert r["setting"] == "[avatar] api_secret_file" and "BITHUMAN_API_SECRET" in r["fix"]
        assert r["proxy_saw"] == []
        if not precheck:
            assert r["cause"] == "BithumanError" and "api_secret is required" in r["cause_text"]


def test_service_unreachable(tmp_path: Path, essence1_imx: Path) -> None:
    r = run_child(tmp_path, model=str(essence1_imx), secret=SECRET, proxy="closed")
    assert r["type"] == "ServiceUnreachable", r
    assert (
        r["cause"] == "RuntimeError" and "auth_authenticate: curl_easy_perform" in r["cause_text"]
    )
    assert "internet" in r["fix"] and "DNS" in r["fix"]


@pytest.mark.skipif(not NETNS, reason="needs root + unshare for a network namespace with no DNS")
def test_no_dns(tmp_path: Path, essence1_imx: Path) -> None:
    r = run_child(tmp_path, model=str(essence1_imx), secret=SECRET, proxy="none")
    assert r["type"] == "ServiceUnreachable", r
    assert "resolve host" in r["cause_text"]


@pytest.mark.parametrize(
    ("status", "kind", "words"),
    [
        (401, "CredentialRefused", "REFUSED"),
        (402, "CredentialRefused", "insufficient balance"),
        (403, "CredentialRefused", "account suspended"),
        (500, "ServiceUnreachable", "HTTP 500"),
    ],
)
def test_service_answers(
    tmp_path: Path, essence1_imx: Path, status: int, kind: str, words: str
) -> None:
    r = run_child(tmp_path, model=str(essence1_imx), secret=SECRET, proxy=str(status))
    assert r["proxy_saw"][:2] == [
        "CONNECT api.bithuman.ai:443 HTTP/1.1",
        "POST /v1/runtime-tokens/request HTTP/1.1",
    ], r
    assert r["type"] == kind and r["cause"] == "RuntimeError" and words in r["cause_text"], r
    if kind == "CredentialRefused":
        assert r["setting"] == "[avatar] api_secret_file"


def test_manifest_without_weights_is_invalid(tmp_path: Path) -> None:
    # Essence 2 containers are read before the credential is checked, so a manifest
    # with no weights reaches the model loader (ModelLoadError) without the service.
    # (It first tries to download an audio encoder: the loopback proxy refuses that.)
    imx = make_imx(tmp_path / "e2.imx", {"engine": "essence2-light", "name": "no weights"})
    r = run_child(tmp_path, model=str(imx), secret=SECRET, proxy="closed")
    assert r["type"] == "ModelInvalid" and str(imx) in r["message"], r
    assert r["cause"] == "ModelLoadError" and r["setting"] == "[avatar] model"


@pytest.mark.skip(
    reason=(
        "Essence 1 (and any file without a readable IMX manifest) authenticates online first: "
        "the SDK needs an HS256-signed runtime token from api.bithuman.ai before it reads the "
        "model, so a garbage or weightless Essence 1 .imx reaches the model loader only with "
        "the real service; here it ends as ServiceUnreachable (see test_garbage_imx_auth_first)"
    )
)
def test_garbage_essence1_imx_is_invalid() -> None:
    pass


def test_garbage_imx_auth_first(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.imx"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    r = run_child(tmp_path, model=str(garbage), secret=SECRET, proxy="closed")
    assert r["type"] == "ServiceUnreachable", r


def test_map_sdk_error_covers_the_sdk_tree() -> None:
    cases = [
        (bithuman.ModelNotFoundError("x"), ModelMissing),
        (bithuman.ModelLoadError("x"), ModelInvalid),
        (bithuman.ModelSecurityError("x"), ModelInvalid),
        (bithuman.AccountStatusError("402"), CredentialRefused),
        (bithuman.TokenValidationError("x"), CredentialRefused),
        (bithuman.TokenRequestError("timeout"), ServiceUnreachable),
        (bithuman.BithumanError("AsyncAvatar.create: api_secret is required."), CredentialMissing),
        (
            RuntimeError("auth_authenticate: curl_easy_perform: Timeout was reached"),
            ServiceUnreachable,
        ),
        (RuntimeError("auth_authenticate: account suspended: {}"), CredentialRefused),
        (RuntimeError("auth_authenticate: 200 response missing token"), ServiceUnreachable),
        (RuntimeError("bithuman: this package cannot run this avatar's engine"), ModelInvalid),
        (bithuman.NotAuthorised("no"), CredentialRefused),
        (bithuman.InvalidAvatar("no"), ModelInvalid),
    ]
    for exc, kind in cases:
        failure = map_sdk_error(exc, "/m.imx", secret="s3cret")
        assert type(failure) is kind, (exc, failure)
        assert failure.fix and "s3cret" not in failure.operator_line()
    assert "***" in str(
        map_sdk_error(RuntimeError("auth_authenticate: HTTP 401 s3cret"), "/m", "s3cret")
    )


def test_convert_frame() -> None:
    spec = VideoSpec(8, 4, 25.0)
    bgr = np.zeros((4, 8, 3), np.uint8)
    bgr[..., 0] = 200  # blue in BGR
    idle = convert_frame(bithuman.VideoFrame(bgr_image=bgr), spec, None)
    assert idle is not None and idle.image[0, 0].tolist() == [0, 0, 200]  # RGB
    assert idle.audio.shape == (640,) and not idle.audio.any() and not idle.speaking

    pcm = np.arange(960, dtype=np.int16)  # 40 ms at 24 kHz
    vf = bithuman.VideoFrame(
        bgr_image=bgr, audio_chunk=bithuman.AudioChunk(pcm, 24000, False), end_of_speech=True
    )
    f = convert_frame(vf, spec, None)
    assert f is not None and f.speaking and f.end_of_speech
    assert f.audio.dtype == np.int16 and f.audio.shape == (640,) and f.audio[-1] > 600

    marker = bithuman.VideoFrame(end_of_speech=True)  # control-only: no picture
    assert convert_frame(marker, spec, None) is None
    again = convert_frame(marker, spec, idle.image)
    assert again is not None and again.end_of_speech and again.image is idle.image


@pytest.mark.skip(
    reason=(
        "rendering needs a real .imx avatar and bitHuman's service (the credential is checked "
        "online before the model loads); neither is available here: rendering in tests uses "
        "the reference runtime"
    )
)
def test_renders_frames() -> None:
    pass
