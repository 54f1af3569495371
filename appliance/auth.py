"""Join tokens for the kiosk's LiveKit identities.

Two sources, chosen by ``[livekit]``: minted here from ``api_key`` and the
secret in ``api_secret_file`` (identity, kind and room fixed, publish/subscribe/
data grants only, short TTL), or fetched from the operator's ``token_url``.
A token is reused until 80 % of its life has passed, then refreshed.

The avatar joins with kind **agent**, the way LiveKit Agents' avatar workers do:
an agent never links to an agent-kind participant as its user, and front ends
show it as the avatar of the agent named in its ``lk.publish_on_behalf``
attribute (which it updates itself, so its token may update its own metadata).
"""

from __future__ import annotations

import datetime
import json
import time
import urllib.parse
from dataclasses import dataclass

import aiohttp
from livekit import api

from appliance.config import Config, Secret
from appliance.errors import OperatorError

__all__ = ["TokenError", "TokenSource", "MintedTokens", "FetchedTokens", "Role", "AVATAR", "VISITOR", "ROOM_ADMIN",
           "WORKER_TTL_S", "tokens_for", "worker_role",
           "PUBLISH_ON_BEHALF", "NO_AGENT_YET"]

# The attribute LiveKit Agents and its front ends read to pair an avatar with its agent.
PUBLISH_ON_BEHALF = "lk.publish_on_behalf"
# Its value until a conversation agent joins: no participant has this identity.
NO_AGENT_YET = "none"


@dataclass(frozen=True)
class Role:
    """What a participant of the kiosk may be and do in the room."""

    kind: str  # "agent" | "standard"; "" for a token that joins nothing
    can_subscribe: bool
    can_update_metadata: bool
    attributes: tuple[tuple[str, str], ...] = ()
    room_admin: bool = False  # server API calls about the kiosk's own room, no join


AVATAR = Role(kind="agent", can_subscribe=True, can_update_metadata=True,
              attributes=((PUBLISH_ON_BEHALF, NO_AGENT_YET),))
# The visitor's microphone: the one standard participant, the user an agent links to; it
# listens to nothing.
VISITOR = Role(kind="standard", can_subscribe=False, can_update_metadata=False)
# Agent dispatch (AgentDispatchService) for the kiosk's room only: roomAdmin of that one room,
# minted (or fetched) when needed and short-lived, never a project-wide admin token.
ROOM_ADMIN = Role(kind="", can_subscribe=False, can_update_metadata=False, room_admin=True)
ADMIN_TTL_S = 600
# A remote avatar worker (the fallback ladder's): an agent that is the kiosk's avatar, minted
# short-lived for the kiosk's room only, with no secret in any attribute.
WORKER_TTL_S = 600


def worker_role(kiosk_identity: str) -> Role:
    return Role(kind="agent", can_subscribe=True, can_update_metadata=False,
                attributes=((PUBLISH_ON_BEHALF, kiosk_identity),))


class TokenError(OperatorError):
    """No token could be had; ``setting`` and ``fix`` say what to change."""


@dataclass
class _Cached:
    token: str
    expires_at: float  # monotonic


class TokenSource:
    """Base: ``await source.token()`` gives a valid join token."""

    def __init__(self) -> None:
        self._cached: _Cached | None = None

    async def token(self) -> str:
        now = time.monotonic()
        if self._cached is None or now >= self._cached.expires_at:
            token, ttl_s = await self._new_token()
            self._cached = _Cached(token, now + 0.8 * ttl_s)
        return self._cached.token

    def invalidate(self) -> None:
        self._cached = None

    async def _new_token(self) -> tuple[str, float]:
        raise NotImplementedError


class MintedTokens(TokenSource):
    def __init__(
        self,
        *,
        api_key: str,
        api_secret: Secret,
        room: str,
        identity: str,
        ttl_s: int,
        role: Role = AVATAR,
        name: str = "",
    ) -> None:
        super().__init__()
        self._api_key = api_key
        self._api_secret = api_secret
        self._room = room
        self._identity = identity
        self._ttl_s = ttl_s
        self._role = role
        self._name = name or identity

    async def _new_token(self) -> tuple[str, float]:
        role = self._role
        if role.room_admin:
            ttl_s = min(self._ttl_s, ADMIN_TTL_S)
            admin = (api.AccessToken(self._api_key, self._api_secret.reveal())
                     .with_identity(self._identity)
                     .with_grants(api.VideoGrants(room_admin=True, room=self._room))
                     .with_ttl(datetime.timedelta(seconds=ttl_s)).to_jwt())
            return admin, float(ttl_s)
        grants = api.VideoGrants(
            room_join=True,
            room=self._room,
            can_publish=True,
            can_subscribe=role.can_subscribe,
            can_publish_data=True,
            can_update_own_metadata=role.can_update_metadata,
        )
        token = (
            api.AccessToken(self._api_key, self._api_secret.reveal())
            .with_identity(self._identity)
            .with_name(self._name)
            .with_kind(role.kind)  # type: ignore[arg-type]  # one of the Literal's values
            .with_grants(grants)
            .with_attributes(dict(role.attributes))
            .with_ttl(datetime.timedelta(seconds=self._ttl_s))
            .to_jwt()
        )
        return token, float(self._ttl_s)


class FetchedTokens(TokenSource):
    """GET ``token_url?room=..&identity=..&kind=..`` → JSON {"token": "...", "ttl_s"?: n} or a bare JWT.

    The service should answer a token of that kind for that identity; for ``kind=agent`` (the
    avatar) with ``canUpdateOwnMetadata``, so the avatar can name the agent it serves. For agent
    dispatch the kiosk asks ``?room=..&identity=..&grant=room_admin``: a short-lived token with
    ``roomAdmin`` for that room only (no join). For a remote avatar worker of the fallback
    ladder, ``?room=..&identity=bithuman-avatar-agent&kind=agent&lk.publish_on_behalf=<kiosk>``:
    kind agent with that attribute and nothing else (no secret in it), short-lived."""

    def __init__(self, *, url: str, room: str, identity: str, role: Role = AVATAR,
                 timeout_s: float = 10.0) -> None:
        super().__init__()
        self._url = url
        self._room = room
        self._identity = identity
        self._role = role
        self._timeout_s = timeout_s

    async def _new_token(self) -> tuple[str, float]:
        wants = {"grant": "room_admin"} if self._role.room_admin else {"kind": self._role.kind}
        if self._role.attributes and self._role is not AVATAR:  # a remote worker: whose avatar it is
            wants.update(dict(self._role.attributes))
        query = urllib.parse.urlencode({"room": self._room, "identity": self._identity, **wants})
        url = f"{self._url}{'&' if '?' in self._url else '?'}{query}"
        try:
            timeout = aiohttp.ClientTimeout(total=self._timeout_s)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(url) as response:
                    body = await response.text()
                    if response.status != 200:
                        raise TokenError(
                            f"{self._url} answered HTTP {response.status}", setting="[livekit] token_url",
                            fix="check the URL and that the kiosk is allowed to get tokens")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TokenError(f"cannot reach {self._url} ({type(exc).__name__})",
                             setting="[livekit] token_url", fix="check the network and the URL") from None
        body = body.strip()
        ttl_s = 600.0
        if body.startswith("{"):
            try:
                data = json.loads(body)
                token = str(data["token"])
                ttl_s = float(data.get("ttl_s", ttl_s))
            except (ValueError, KeyError, TypeError):
                raise TokenError(f"{self._url} did not answer JSON with a \"token\" field",
                                 setting="[livekit] token_url",
                                 fix="answer {\"token\": \"<JWT>\"} or the bare JWT") from None
        else:
            token = body
        if token.count(".") != 2:
            raise TokenError(f"{self._url} did not answer a JWT", setting="[livekit] token_url",
                             fix="answer {\"token\": \"<JWT>\"} or the bare JWT")
        return token, ttl_s


def tokens_for(config: Config, role: Role = AVATAR, identity: str = "", ttl_s: int = 0) -> TokenSource:
    """Join tokens for one of the kiosk's participants (default the avatar, ``[livekit]
    identity``; the visitor with ``VISITOR`` and its identity), with the same credentials, as
    ``[livekit]`` says: fetched from token_url, or minted."""
    lk = config.livekit
    identity = identity or lk.identity
    if lk.token_url:
        return FetchedTokens(url=lk.token_url, room=lk.room, identity=identity, role=role,
                             timeout_s=lk.connect_timeout_s)
    secret = config.secret("livekit.api_secret")
    if lk.api_key and lk.api_secret_file and secret is None:
        raise TokenError(
            f"the secret in {lk.api_secret_file} could not be read (see above); not joining",
            setting="[livekit] api_secret_file", fix="fix it, then `systemctl restart appliance`")
    if not lk.api_key or secret is None:
        raise TokenError("no way to get a join token",
                         setting="[livekit] api_key / api_secret_file / token_url",
                         fix="set api_key and api_secret_file, or token_url")
    return MintedTokens(api_key=lk.api_key, api_secret=secret, room=lk.room,
                        identity=identity, ttl_s=ttl_s or lk.token_ttl_s, role=role)
