"""The visitor participant's token: same credentials, its own identity, kind standard."""

from __future__ import annotations

from livekit import api

from appliance.auth import NO_AGENT_YET, PUBLISH_ON_BEHALF, VISITOR, tokens_for
from appliance.config.schema import Config, LiveKitSection, Secret, VisitorSection

SECRET = "visitor-test-secret-0123456789abcdef"


async def test_visitor_token_has_its_identity_and_no_agent_kind() -> None:
    config = Config(livekit=LiveKitSection(room="lobby", identity="kiosk-7", api_key="key",
                                           api_secret_file="s"),
                    secrets={"livekit.api_secret": Secret(SECRET, "s")})
    assert config.visitor_identity == "kiosk-7-visitor"
    token = await tokens_for(config, VISITOR, identity=config.visitor_identity).token()
    claims = api.TokenVerifier("key", SECRET).verify(token)
    assert claims.identity == "kiosk-7-visitor" and claims.video.room == "lobby"
    assert claims.kind == "standard"  # an agent links only to standard participants
    assert not claims.video.can_subscribe and not claims.attributes
    # the avatar: kind agent (never taken for the user), names the agent it serves itself
    avatar = api.TokenVerifier("key", SECRET).verify(await tokens_for(config).token())
    assert avatar.identity == "kiosk-7" and avatar.kind == "agent"
    assert avatar.attributes == {PUBLISH_ON_BEHALF: NO_AGENT_YET} and avatar.video.can_update_own_metadata
    named = Config(livekit=config.livekit, visitor=VisitorSection(identity="front-desk-mic"),
                   secrets=config.secrets)
    assert named.visitor_identity == "front-desk-mic"
