"""The ``bithuman`` runtime: a real bitHuman ``.imx`` avatar via ``bithuman.AsyncBithuman``.

Facts about the SDK (bithuman 2.12.9) this module is built on, all measured
against the installed package (see tests/test_bithuman_runtime.py):

* ``AsyncBithuman.create(model_path=..., api_secret=..., output_size=None)``
  checks, in this order: the file exists (``ModelNotFoundError``), a secret was
  given or is in ``BITHUMAN_API_SECRET`` (``BithumanError`` "[unknown] ...
  api_secret is required"), then for Essence 1 models (and files it cannot read
  a manifest from) it authenticates online *before* reading the model: the
  native auth raises a plain ``RuntimeError("auth_authenticate: ...")``:
  ``curl_easy_perform: Couldn't resolve host name`` / ``Couldn't connect to
  server`` when offline; ``HTTP 401 ... REFUSED``, ``insufficient balance``
  (402), ``account suspended`` (403) when the service refuses; ``HTTP 5xx``.
  Essence 2 / Expression 2 models load first (``ModelLoadError``) and meter after.
* ``api_url=`` is ignored unless it is an https bitHuman host; the endpoint is
  always https://api.bithuman.ai.  The native client honours ``https_proxy``
  and ``CURL_CA_BUNDLE`` / ``SSL_CERT_FILE``.
* ``output_size=None`` keeps the model's own size and makes Essence yield
  resting frames while idle.  ``run()`` yields ``VideoFrame(bgr_image,
  audio_chunk, end_of_speech)`` at the model's rate (``.fps``: 25 Essence, 20
  Expression); ``audio_chunk`` is None while idle.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from appliance.runtimes import (
    AUDIO_SAMPLE_RATE,
    CredentialMissing,
    CredentialRefused,
    Frame,
    ModelInvalid,
    ModelMissing,
    Runtime,
    RuntimeFailure,
    ServiceUnreachable,
    VideoSpec,
)
from appliance.runtimes.reference import resample_linear

__all__ = ["BithumanRuntime", "map_sdk_error", "convert_frame", "SECRET_ENV"]

log = logging.getLogger("appliance.bithuman")

SECRET_ENV = "BITHUMAN_API_SECRET"
MODEL_SETTING = "[avatar] model"
SECRET_SETTING = "[avatar] api_secret_file"
FIX_MISSING = "put the .imx file there, or correct the path"
FIX_INVALID = "download the avatar's .imx again from bitHuman, or point [avatar] model at another"
FIX_NO_SECRET = f"put your bitHuman API secret in that file (or set {SECRET_ENV} for the service)"
FIX_REFUSED = "check the secret and the account (credit, status) at https://www.bithuman.ai/developer/api-keys; retrying will not help"
FIX_UNREACHABLE = (
    "the kiosk needs the internet to authenticate: check the network, DNS, and that the firewall "
    "allows HTTPS to api.bithuman.ai"
)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def map_sdk_error(exc: BaseException, model_path: str, secret: str = "") -> RuntimeFailure:
    """Turn anything ``AsyncBithuman.create`` raises into our exception with one operator line."""
    import bithuman

    text = str(exc)
    if secret:
        text = text.replace(secret, "***")
    where = f"bitHuman avatar {model_path}"
    if isinstance(exc, bithuman.ModelNotFoundError):
        return ModelMissing(f"{where} does not exist", setting=MODEL_SETTING, fix=FIX_MISSING)
    if "api_secret is required" in text or "No API secret found" in text:
        return CredentialMissing(
            "no bitHuman API secret", setting=SECRET_SETTING, fix=FIX_NO_SECRET
        )
    if isinstance(exc, bithuman.TokenRequestError):  # metering could not reach the service
        return ServiceUnreachable(
            f"cannot reach bitHuman to authenticate ({text})", fix=FIX_UNREACHABLE
        )
    if isinstance(exc, bithuman.TokenError):  # AccountStatusError, expired / invalid token
        return CredentialRefused(
            f"bitHuman refused the credential ({text})", setting=SECRET_SETTING, fix=FIX_REFUSED
        )
    if isinstance(exc, bithuman.ModelError):  # ModelLoadError, ModelSecurityError
        return ModelInvalid(
            f"{where} would not load ({text})", setting=MODEL_SETTING, fix=FIX_INVALID
        )
    if isinstance(exc, bithuman.NotAuthorised):
        return CredentialRefused(
            f"bitHuman refused the credential ({text})", setting=SECRET_SETTING, fix=FIX_REFUSED
        )
    if isinstance(exc, bithuman.InvalidAvatar | bithuman.NotSupported):
        return ModelInvalid(
            f"{where} cannot be used here ({text})", setting=MODEL_SETTING, fix=FIX_INVALID
        )
    if type(exc).__name__ == "_Unreachable":
        return ServiceUnreachable(f"cannot reach bitHuman ({text})", fix=FIX_UNREACHABLE)
    if isinstance(exc, RuntimeError) and "auth_authenticate" in text:
        # The native auth (Essence 1) speaks in plain RuntimeErrors; see the module docstring.
        status = re.search(r"auth_authenticate: HTTP (\d{3})", text)
        code = int(status.group(1)) if status else 0
        if "curl_easy_perform" in text:  # DNS, connect, TLS, timeout
            return ServiceUnreachable(
                f"cannot reach bitHuman to authenticate ({text})", fix=FIX_UNREACHABLE
            )
        if code in (401, 402, 403) or any(
            k in text
            for k in ("insufficient balance:", "account suspended:", "REFUSED by the service")
        ):
            return CredentialRefused(
                f"bitHuman refused the credential ({text})", setting=SECRET_SETTING, fix=FIX_REFUSED
            )
        if code == 429 or code >= 500:
            return ServiceUnreachable(
                f"the bitHuman service is not answering ({text})",
                fix="it usually recovers by itself; the kiosk retries",
            )
        return ServiceUnreachable(
            f"bitHuman's credential service gave an answer the SDK could not use ({text})",
            fix="check that no proxy or captive portal intercepts HTTPS to api.bithuman.ai",
        )
    if isinstance(exc, RuntimeError) and "engine" in text:  # e.g. an internal-only engine
        return ModelInvalid(
            f"{where} cannot run here ({text})", setting=MODEL_SETTING, fix=FIX_INVALID
        )
    return RuntimeFailure(
        f"the bitHuman runtime failed to open {model_path}: {type(exc).__name__}: {text}",
        setting=MODEL_SETTING,
    )


def _audio_of(chunk: Any, samples: int) -> np.ndarray:
    """An SDK AudioChunk as exactly ``samples`` of 16 kHz mono int16 (zeros when None)."""
    out = np.zeros(samples, np.int16)
    if chunk is None:
        return out
    data = np.asarray(chunk.data)
    if data.ndim == 2:  # (n, channels)
        data = data.mean(axis=1)
    if data.dtype.kind == "f":
        data = np.clip(data * 32767.0, -32768, 32767)
    pcm = data.astype(np.int16)
    rate = int(getattr(chunk, "sample_rate", AUDIO_SAMPLE_RATE) or AUDIO_SAMPLE_RATE)
    if rate != AUDIO_SAMPLE_RATE:
        pcm = resample_linear(pcm, rate, AUDIO_SAMPLE_RATE)
    n = min(samples, len(pcm))
    out[:n] = pcm[:n]
    return out


def convert_frame(vf: Any, spec: VideoSpec, last_image: np.ndarray | None) -> Frame | None:
    """An SDK VideoFrame as our Frame (RGB, 16 kHz audio of the frame's length).

    A control-only frame (no image) reuses the last image; None if there is none yet.
    """
    bgr = vf.bgr_image
    if bgr is None:
        if last_image is None:
            return None
        image = last_image
    else:
        image = np.ascontiguousarray(bgr[:, :, ::-1])
    return Frame(
        image=image,
        audio=_audio_of(vf.audio_chunk, spec.samples_per_frame),
        speaking=vf.audio_chunk is not None,
        end_of_speech=bool(vf.end_of_speech),
        meta={"runtime": "bithuman"},
    )


class BithumanRuntime(Runtime):
    """``bithuman.AsyncBithuman`` behind our Runtime interface.

    ``api_secret`` None or empty falls back to ``BITHUMAN_API_SECRET``.  With
    ``precheck`` (the default) the file and the secret are checked before the SDK
    is called; the SDK checks both too (tests turn precheck off to see its errors).
    """

    name = "bithuman"

    def __init__(
        self, api_secret: str | None = None, *, precheck: bool = True, num_threads: int = 0
    ) -> None:
        self._secret = (api_secret or "").strip()
        self._precheck = precheck
        self._num_threads = num_threads
        self._rt: Any = None
        self._spec: VideoSpec | None = None
        self._model_path = ""

    @property
    def video(self) -> VideoSpec:
        if self._spec is None:
            raise RuntimeError("BithumanRuntime.video before open()")
        return self._spec

    async def open(self, model_path: str) -> None:
        secret = self._secret or os.environ.get(SECRET_ENV, "").strip()
        if self._precheck:
            if not model_path:
                raise ModelMissing(
                    "no bitHuman .imx model is configured",
                    setting=MODEL_SETTING,
                    fix="set it to the path of your avatar's .imx file",
                )
            if not os.path.exists(model_path):
                raise ModelMissing(
                    f"bitHuman avatar {model_path} does not exist",
                    setting=MODEL_SETTING,
                    fix=FIX_MISSING,
                )
            if os.path.isfile(model_path) and not os.access(model_path, os.R_OK):
                raise ModelMissing(
                    f"bitHuman avatar {model_path} cannot be read (permissions)",
                    setting=MODEL_SETTING,
                    fix="make it readable by the appliance user",
                )
            if not secret:
                raise CredentialMissing(
                    "no bitHuman API secret", setting=SECRET_SETTING, fix=FIX_NO_SECRET
                )
        try:
            from bithuman import AsyncBithuman
        except ImportError as e:
            raise RuntimeFailure(
                f"the bithuman SDK is not installed ({e})",
                setting="[avatar] runtime",
                fix='install the appliance with its dependencies, or use runtime = "reference"',
            ) from e
        try:
            # output_size=None: the model's own size, and resting frames while idle (Essence).
            rt = await AsyncBithuman.create(
                model_path=model_path,
                api_secret=secret or None,
                output_size=None,
                num_threads=self._num_threads,
            )
        except Exception as e:
            failure = map_sdk_error(e, model_path, secret)
            log.warning("bithuman: %s", failure.operator_line())
            raise failure from e
        self._rt, self._model_path = rt, model_path
        width, height = rt.frame_width, rt.frame_height
        if not width or not height:  # size known only once the first frame exists
            import asyncio

            try:
                first = await asyncio.to_thread(rt.get_first_frame)
            except Exception as e:  # AccountStatusError when the service refused meanwhile
                await self.close()
                raise map_sdk_error(e, model_path, secret) from e
            if first is None:
                await self.close()
                raise RuntimeFailure(
                    f"bitHuman avatar {model_path} produced no frame",
                    setting=MODEL_SETTING,
                    fix=FIX_INVALID,
                )
            height, width = first.shape[:2]
        self._spec = VideoSpec(int(width), int(height), float(rt.fps or 25))

    async def push_audio(self, pcm16: bytes, sample_rate: int, last_chunk: bool = False) -> None:
        await _maybe_await(
            self._require().push_audio(bytes(pcm16), int(sample_rate), last_chunk=last_chunk)
        )

    async def flush(self) -> None:
        await _maybe_await(self._require().flush())

    async def interrupt(self) -> None:
        await _maybe_await(self._require().interrupt())

    async def frames(self) -> AsyncIterator[Frame]:
        rt, spec = self._require(), self.video
        last: np.ndarray | None = None
        # When metering refuses mid-session, run() simply stops yielding (no exception, no
        # end); after a network loss it renders ~300 s more, pauses, and resumes by itself.
        # Only the supervisor's frame-flow watchdog notices: nothing to do here.
        async for vf in rt.run():
            frame = convert_frame(vf, spec, last)
            if frame is None:
                continue
            last = frame.image
            yield frame

    async def close(self) -> None:
        rt, self._rt = self._rt, None
        if rt is None:
            return
        try:
            await _maybe_await(rt.shutdown())
        except Exception:
            log.exception("bithuman: shutdown failed")

    def _require(self) -> Any:
        if self._rt is None:
            raise RuntimeError("BithumanRuntime used before open() or after close()")
        return self._rt
