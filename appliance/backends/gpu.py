"""The GPU rung: a session on the operator's own bitHuman GPU container (Expression).

The container's HTTP API, as bitHuman documents it (facts in shared/facts/fallback-facts.md,
A3); it has no auth of its own, a gateway in front of it may want a bearer token
(``gpu_api_secret_file``):

    GET  {gpu_api_url}/ready               200 {status "ready", available_sessions, …}
                                           503 {status "not_ready" | "at_capacity"}
    POST {gpu_api_url}/launch              multipart livekit_url, livekit_token, room_name,
                                           model, async_mode, avatar_image | avatar_image_url
                                           → {status "pending", task_id, room_name}
    POST {gpu_api_url}/tasks/{task_id}/stop

A container that is not ready within READY_TIMEOUT_S, still warming up (minutes after its
start) or full is skipped at once for the next rung: waiting for it would keep the kiosk on
hold frames. The worker joins under its own identity (``<kiosk>-gpu``), never the cloud's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp

from appliance.backends.cloud import (
    ATTEMPT_TIMEOUT_S,
    RETRY_FOR_S,
    RungFailed,
    parse_retry_after,
    with_retries,
)
from appliance.config import Secret

__all__ = ["READY_TIMEOUT_S", "GpuRung"]

log = logging.getLogger("appliance.backends.gpu")

READY_TIMEOUT_S = 2.0  # GET /ready must answer 200 within this, else the next rung


class GpuRung:
    name = "gpu"

    def __init__(self, api_url: str, kiosk_identity: str, avatar_image: str, secret: Secret | None, *,
                 attempt_timeout_s: float = ATTEMPT_TIMEOUT_S, retry_for_s: float = RETRY_FOR_S) -> None:
        self.api_url = api_url.rstrip("/")
        self.worker_identity = f"{kiosk_identity}-gpu"
        self.avatar_image, self._secret = avatar_image, secret
        self.attempt_timeout_s, self.retry_for_s = attempt_timeout_s, retry_for_s
        self.attempts = 0  # requests sent, for status and tests

    async def launch(self, livekit_url: str, room: str, worker_token: str) -> str:
        """Start a GPU avatar session in ``room``; its task id. Raises RungFailed."""
        await self._ready()
        fields = {"livekit_url": livekit_url, "livekit_token": worker_token, "room_name": room,
                  "model": "expression", "async_mode": "true"}
        image: bytes | None = None
        if self.avatar_image.startswith(("https://", "http://")):
            fields["avatar_image_url"] = self.avatar_image
        elif self.avatar_image:
            try:
                image = Path(self.avatar_image).read_bytes()
            except OSError as exc:
                raise RungFailed(f"cannot read the GPU rung's portrait {self.avatar_image} ({exc.strerror})",
                                 setting="[fallback] gpu_avatar_image",
                                 fix="point it at a readable JPEG or PNG, or an https:// URL") from None

        def form() -> aiohttp.FormData:  # a FormData is spent once sent: one per attempt
            data = aiohttp.FormData()
            for key, value in fields.items():
                data.add_field(key, value)
            if image is not None:
                data.add_field("avatar_image", image, filename=Path(self.avatar_image).name,
                               content_type="image/png" if self.avatar_image.endswith(".png") else "image/jpeg")
            return data

        answer = await with_retries(lambda: self._call("POST", "/launch", form()), self.retry_for_s)
        task_id = str(answer.get("task_id") or "")
        if not task_id:
            raise RungFailed(f"the GPU container started no task: {answer}", setting="[fallback] gpu_api_url",
                             fix="point gpu_api_url at a bitHuman GPU container (port 8089)")
        log.info("GPU task %s started", task_id, extra={"backend": "gpu"})
        return task_id

    async def end(self, task_id: str) -> None:
        """Stop the task and free its slot; best effort, never raises."""
        try:
            await self._call("POST", f"/tasks/{task_id}/stop", None)
            log.info("GPU task %s stopped", task_id)
        except RungFailed as exc:
            log.warning("stopping GPU task %s: %s", task_id, exc)

    async def _ready(self) -> None:
        try:
            answer = await self._call("GET", "/ready", None, timeout_s=READY_TIMEOUT_S)
        except RungFailed as exc:
            raise RungFailed(f"the GPU container is not ready ({exc})", setting=exc.setting or "[fallback] gpu_api_url",
                             fix="the next rung serves meanwhile; the GPU is asked again at the next hand-over "
                                 "(a container takes minutes to warm up after its start)") from None
        if answer.get("status", "ready") != "ready":
            raise RungFailed(f"the GPU container is not ready ({answer.get('status')})",
                             setting="[fallback] gpu_api_url", fix="the next rung serves meanwhile")

    async def _call(self, method: str, path: str, data: aiohttp.FormData | None, *,
                    timeout_s: float = 0.0) -> dict[str, Any]:
        self.attempts += 1
        headers = {"Authorization": f"Bearer {self._secret.reveal()}"} if self._secret is not None else {}
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.attempt_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http, http.request(
                    method, self.api_url + path, data=data, headers=headers) as response:
                try:
                    answer = await response.json(content_type=None)
                except ValueError:
                    answer = {}
                if response.status == 200 and isinstance(answer, dict):
                    return answer
                raise _failure(response.status, answer if isinstance(answer, dict) else {},
                               response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            why = f"no answer within {timeout.total:g} s" if isinstance(exc, TimeoutError) else str(exc)
            raise RungFailed(f"GPU container unreachable ({why})", setting="[fallback] gpu_api_url",
                             fix="check the network, the container and gpu_api_url", retryable=True) from None


def _failure(status: int, answer: dict[str, Any], retry_after: str | None) -> RungFailed:
    said = answer.get("status") or answer.get("detail") or answer.get("error") or ""
    what = f"GPU container answered {status}" + (f" ({said})" if said else "")
    if status == 503 and said == "at_capacity":  # full: the next rung at once
        return RungFailed(what, setting="[fallback] gpu_api_url", fix="the container's sessions are all taken "
                          "(MAX_SESSIONS); the next rung serves meanwhile")
    if status == 400:
        return RungFailed(what, setting="[fallback] gpu_avatar_image",
                          fix="the container refused the portrait: use a JPEG or PNG of a face, or a reachable URL")
    if status in (401, 403):
        return RungFailed(what, setting="[fallback] gpu_api_secret_file",
                          fix="put the gateway's bearer token in that file")
    if status in (404, 405):
        return RungFailed(what, setting="[fallback] gpu_api_url",
                          fix="point gpu_api_url at a bitHuman GPU container (port 8089), not a path below it")
    return RungFailed(what, setting="[fallback] gpu_api_url", fix="the GPU container is busy or failing; retried",
                      retryable=status == 429 or status >= 500, retry_after_s=parse_retry_after(retry_after))
