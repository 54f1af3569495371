"""Access tokens: verify the client's JWT the way livekit-server does.

A token is an HS256 JWT signed with the API secret, issued by the API key, with
the participant identity in `sub` and the grants in `video`.  The participant's
`kind`, `name`, `metadata` and `attributes` come from the token too, and other
participants must see them (LiveKit Agents waits for a participant of kind agent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jwt
from livekit import api
from livekit.protocol import models


class AuthError(Exception):
    """The token is missing, malformed, expired, badly signed or lacks a grant."""


_KINDS = {
    "": models.ParticipantInfo.Kind.STANDARD,
    "standard": models.ParticipantInfo.Kind.STANDARD,
    "ingress": models.ParticipantInfo.Kind.INGRESS,
    "egress": models.ParticipantInfo.Kind.EGRESS,
    "sip": models.ParticipantInfo.Kind.SIP,
    "agent": models.ParticipantInfo.Kind.AGENT,
}


@dataclass(frozen=True)
class Grant:
    """What a verified token allows, flattened for the server."""

    identity: str
    room: str
    name: str = ""
    kind: int = models.ParticipantInfo.Kind.STANDARD
    metadata: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    can_publish: bool = True
    can_subscribe: bool = True
    can_publish_data: bool = True
    can_update_metadata: bool = False
    hidden: bool = False

    def permission(self) -> models.ParticipantPermission:
        return models.ParticipantPermission(
            can_subscribe=self.can_subscribe,
            can_publish=self.can_publish,
            can_publish_data=self.can_publish_data,
            can_update_metadata=self.can_update_metadata,
            hidden=self.hidden,
        )


def verify(token: str | None, api_key: str, api_secret: str) -> Grant:
    """Return the token's grant for joining a room, or raise AuthError saying why."""
    if not token:
        raise AuthError("no access token: pass it as 'Authorization: Bearer <token>'")
    try:
        claims = api.TokenVerifier(api_key, api_secret).verify(token)
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("invalid token: the token has expired") from exc
    except jwt.InvalidIssuerError as exc:
        raise AuthError(f"invalid token: it was not issued by API key {api_key!r}") from exc
    except jwt.InvalidSignatureError as exc:
        raise AuthError(
            "invalid token: signature does not match, the token was signed with another API secret"
        ) from exc
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise AuthError(f"invalid token: {exc}") from exc

    video = claims.video or api.VideoGrants()
    if not claims.identity:
        raise AuthError("invalid token: no participant identity (sub claim)")
    if not video.room_join:
        raise AuthError("permission denied: the token has no roomJoin grant")
    if not video.room:
        raise AuthError("permission denied: the token names no room")
    kind = _KINDS.get((claims.kind or "").lower())
    if kind is None:
        raise AuthError(f"invalid token: unknown participant kind {claims.kind!r}")
    return Grant(
        identity=claims.identity,
        room=video.room,
        name=claims.name or "",
        kind=kind,
        metadata=claims.metadata or "",
        attributes=dict(claims.attributes or {}),
        can_publish=bool(video.can_publish),
        can_subscribe=bool(video.can_subscribe),
        can_publish_data=bool(video.can_publish_data),
        can_update_metadata=bool(video.can_update_own_metadata),
        hidden=bool(video.hidden),
    )
