"""The kiosk's other tokens: the visitor participant's (same credentials, its own identity,
kind standard) and agent dispatch's (roomAdmin for the kiosk's room, nothing else)."""

from __future__ import annotations

from aiohttp import web
from livekit import api

from appliance.auth import NO_AGENT_YET, PUBLISH_ON_BEHALF, ROOM_ADMIN, VISITOR, tokens_for
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


async def test_the_dispatch_token_is_room_admin_of_the_kiosks_room_only() -> None:
    config = Config(livekit=LiveKitSection(room="lobby", identity="kiosk-7", api_key="key",
                                           api_secret_file="s"),
                    secrets={"livekit.api_secret": Secret(SECRET, "s")})
    claims = api.TokenVerifier("key", SECRET).verify(await tokens_for(config, ROOM_ADMIN).token())
    assert claims.video.room_admin and claims.video.room == "lobby"
    assert not (claims.video.room_join or claims.video.room_create or claims.video.room_list)
    assert not claims.video.agent

    # from token_url: the documented request, ?room=..&identity=..&grant=room_admin
    asked: list[dict[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(dict(request.query))
        return web.json_response({"token": "a.b.c", "ttl_s": 60})

    app = web.Application()
    app.router.add_get("/token", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        fetched = Config(livekit=LiveKitSection(room="lobby", identity="kiosk-7",
                                                token_url=f"http://127.0.0.1:{port}/token"))
        assert await tokens_for(fetched, ROOM_ADMIN).token() == "a.b.c"
        assert asked == [{"room": "lobby", "identity": "kiosk-7", "grant": "room_admin"}]
    finally:
        await runner.cleanup()
