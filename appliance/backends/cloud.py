"""The bitHuman cloud rung: a cloud avatar session, started for the kiosk's room.

The kiosk sends the requests livekit-plugins-bithuman would (it cannot call the plugin outside
a LiveKit Agents job), with what the plugin lacks: a total timeout per attempt (the plugin has
only a connect timeout, so a server that accepts and never answers hangs it for ever),
``Retry-After`` and exponential backoff with jitter for 503/429/5xx and connection errors,
and no retry at all for 400/401/402/403/404/409, which become one operator line with the fix.
The account secret goes in the ``api-secret`` header to the API host only; the worker's join
token, minted by the kiosk, carries no secret (the plugin puts it in room-visible
attributes; we never do).

    POST {cloud_api_url}/v1/runtime-tokens/request   {mode, model, agent_id, livekit_url,
                                                      livekit_token, room_name} → session_id
    POST {cloud_api_url}/v1/runtime-sessions/{id}/end
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from appliance.config import Secret
from appliance.errors import OperatorError
from appliance.retry import Backoff

__all__ = ["ATTEMPT_TIMEOUT_S", "RETRY_FOR_S", "WORKER_IDENTITY", "CloudRung", "RungFailed", "parse_retry_after", "with_retries"]

log = logging.getLogger("appliance.backends.cloud")
T = TypeVar("T")

ATTEMPT_TIMEOUT_S = 15.0  # one request, connect to last byte
RETRY_FOR_S = 20.0  # retryable failures this long, then the next rung
WORKER_IDENTITY = "bithuman-avatar-agent"  # the identity bitHuman's cloud page documents

# bitHuman's refusals: no retry; the setting and the fix an operator needs
REFUSED = {
    400: ("[fallback] cloud_avatar_id", "check cloud_avatar_id and cloud_model against the bitHuman dashboard"),
    401: ("[avatar] api_secret_file", "put the API secret from the bitHuman dashboard in that file"),
    402: ("[avatar] api_secret_file", "the bitHuman account is out of credits: top it up"),
    403: ("[fallback] cloud_model", "the bitHuman plan does not allow this (model not in the plan, or "
                                    "too many sessions at once): change the plan or cloud_model"),
    404: ("[fallback] cloud_avatar_id", "no such avatar in this bitHuman account: check cloud_avatar_id"),
    409: ("[fallback] cloud_model", "this avatar cannot be served as cloud_model (or is not ready yet)"),
}


class RungFailed(OperatorError):
    """A rung could not start; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, setting: str = "", fix: str = "", retryable: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, setting=setting, fix=fix)
        self.retryable, self.retry_after_s = retryable, retry_after_s


def parse_retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: rare from an API; fall back to our own backoff
        return None


def _failure(status: int, answer: Any, retry_after: str | None) -> RungFailed:
    error = answer.get("error") if isinstance(answer, dict) else None
    code = error.get("code", "") if isinstance(error, dict) else ""
    said = (error.get("message") if isinstance(error, dict) else "") or ""
    what = f"bitHuman cloud answered {status}" + (f" {code}" if code else "") + (f": {said}" if said else "")
    if status in REFUSED:
        setting, fix = REFUSED[status]
        return RungFailed(what, setting=setting, fix=fix)
    return RungFailed(what, setting="[fallback] cloud_api_url", fix="bitHuman is busy or down; retried",
                      retryable=status == 429 or status >= 500, retry_after_s=parse_retry_after(retry_after))


async def with_retries(attempt: Callable[[], Awaitable[T]], retry_for_s: float) -> T:
    """``attempt()`` again after a retryable RungFailed (its Retry-After, else exponential
    backoff with jitter) for up to ``retry_for_s``; other failures are raised at once."""
    backoff = Backoff(first_s=1.0, max_s=8.0, jitter=0.2)
    give_up = time.monotonic() + retry_for_s
    while True:
        try:
            return await attempt()
        except RungFailed as exc:
            delay = exc.retry_after_s if exc.retry_after_s is not None else backoff.next_delay()
            if not exc.retryable or time.monotonic() + delay > give_up:
                raise
            log.info("%s; retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)


class CloudRung:
    name = "cloud"
    worker_identity = WORKER_IDENTITY

    def __init__(self, api_url: str, avatar_id: str, model: str, secret: Secret | None, *,
                 attempt_timeout_s: float = ATTEMPT_TIMEOUT_S, retry_for_s: float = RETRY_FOR_S) -> None:
        self.api_url = api_url.rstrip("/")
        self.avatar_id, self.model, self._secret = avatar_id, model, secret
        self.attempt_timeout_s, self.retry_for_s = attempt_timeout_s, retry_for_s
        self.attempts = 0  # requests sent, for status and tests

    async def launch(self, livekit_url: str, room: str, worker_token: str) -> str:
        """Start a cloud avatar session in ``room``; its id. Raises RungFailed."""
        if self._secret is None:
            raise RungFailed("no bitHuman API secret", setting="[avatar] api_secret_file",
                             fix="the cloud rung needs the bitHuman API secret in that file")
        if not self.avatar_id:
            raise RungFailed("no cloud avatar", setting="[fallback] cloud_avatar_id",
                             fix="set it to the avatar's agent id from the bitHuman dashboard")
        body = {"mode": "cpu", "model": self.model, "agent_id": self.avatar_id,
                "livekit_url": livekit_url, "livekit_token": worker_token, "room_name": room}
        answer = await with_retries(lambda: self._post("/v1/runtime-tokens/request", body), self.retry_for_s)
        session_id = str(answer.get("session_id") or "")
        if not session_id:
            raise RungFailed(f"bitHuman cloud started no session: {answer}", setting="[fallback] cloud_api_url",
                             fix="point cloud_api_url at bitHuman's API (https://api.bithuman.ai)")
        log.info("cloud session %s started (model %s)", session_id, answer.get("model"), extra={"backend": "cloud"})
        return session_id

    async def end(self, session_id: str) -> None:
        """End the session (billing stops at once); best effort, never raises."""
        try:
            answer = await self._post(f"/v1/runtime-sessions/{session_id}/end", None)
            log.info("cloud session %s ended (billed %s s)", session_id, answer.get("billed_seconds"))
        except RungFailed as exc:
            log.warning("ending cloud session %s: %s", session_id, exc)

    async def _post(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        assert self._secret is not None
        self.attempts += 1
        timeout = aiohttp.ClientTimeout(total=self.attempt_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http, http.post(
                    self.api_url + path, json=body, headers={"api-secret": self._secret.reveal()}) as response:
                try:
                    answer = await response.json(content_type=None)
                except ValueError:
                    answer = {}
                if response.status == 200 and isinstance(answer, dict):
                    return answer
                raise _failure(response.status, answer, response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            why = f"no answer within {self.attempt_timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
            raise RungFailed(f"bitHuman cloud unreachable ({why})", setting="[fallback] cloud_api_url",
                             fix="check the network and cloud_api_url; retried", retryable=True) from None
