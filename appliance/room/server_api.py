"""LiveKit's server APIs (Twirp over HTTP, protobuf bodies), as the kiosk calls them:
AgentDispatchService for conversations, RoomService.RemoveParticipant for remote workers.

Every call carries a short-lived token with ``roomAdmin`` for the kiosk's room only.
"""

from __future__ import annotations

import json

import aiohttp
from google.protobuf.message import Message

from appliance.auth import TokenSource

__all__ = ["ServerApiError", "call", "http_url"]

TIMEOUT_S = 10.0


class ServerApiError(Exception):
    pass


def http_url(ws_url: str) -> str:
    """The server API's base URL for a signalling URL (ws → http, wss → https)."""
    return "http" + ws_url[len("ws"):] if ws_url.startswith("ws") else ws_url


async def call(url: str, method: str, tokens: TokenSource, request: Message, answer: Message) -> Message:
    """``method`` ("RoomService/RemoveParticipant") on the server of signalling ``url``."""
    endpoint = http_url(url).rstrip("/") + "/twirp/livekit." + method
    token = await tokens.token()
    try:
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http, http.post(
                endpoint, data=request.SerializeToString(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/protobuf"}) as resp:
            body = await resp.read()
            if resp.status != 200:
                try:
                    error = json.loads(body)
                    code, msg = error.get("code", ""), error.get("msg", "")
                except ValueError:
                    code, msg = "", body[:200].decode(errors="replace")
                if resp.status in (401, 403):
                    tokens.invalidate()
                raise ServerApiError(f"{method} refused by the server: HTTP {resp.status} {code}: {msg}")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ServerApiError(f"{method}: cannot reach {endpoint} ({type(exc).__name__})") from None
    answer.ParseFromString(body)
    return answer
