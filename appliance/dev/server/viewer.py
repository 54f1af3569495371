"""The dev server's browser viewer: watch and hear the avatar with nothing but a browser.

`GET /viewer/` is a small page (`web/viewer.html`, `web/viewer.js`) that joins the
room with the official `livekit-client` JavaScript SDK at its default options,
served from `web/node_modules` (installed by `make setup` from the pinned
`web/package.json`).  With a viewer room set, `GET /viewer/token` mints a
subscribe-only token for a fresh `viewer-…` identity, so the page needs no
parameters; the page also takes `?url=…&token=…` for any other server and room.
"""

from __future__ import annotations

import datetime
import json
import secrets
from pathlib import Path
from typing import Protocol

from aiohttp import web
from livekit import api

WEB_DIR = Path(__file__).with_name("web")
CLIENT_BUNDLE = WEB_DIR / "node_modules" / "livekit-client" / "dist" / "livekit-client.umd.js"
# Every file the viewer serves, by URL name: nothing else under web/ is reachable.
_FILES = {
    "": (WEB_DIR / "viewer.html", "text/html"),
    "viewer.js": (WEB_DIR / "viewer.js", "text/javascript"),
    "livekit-client.umd.js": (CLIENT_BUNDLE, "text/javascript"),
}
VIEWER_TOKEN_TTL_S = 6 * 3600


def client_installed() -> bool:
    return CLIENT_BUNDLE.is_file()


def missing_client_help() -> str:
    return (
        f"livekit-client is not installed ({CLIENT_BUNDLE} is missing): "
        f"run `make setup` (or `npm ci --prefix {WEB_DIR}`)"
    )


def viewer_token(api_key: str, api_secret: str, room: str) -> str:
    """A token that may watch `room` and nothing else (no publishing, no data)."""
    identity = f"viewer-{secrets.token_hex(4)}"
    grants = api.VideoGrants(
        room_join=True, room=room, can_subscribe=True, can_publish=False, can_publish_data=False,
        hidden=True,  # a watcher, not a user: an agent must not link to it
    )
    token = api.AccessToken(api_key, api_secret).with_identity(identity).with_grants(grants)
    return token.with_ttl(datetime.timedelta(seconds=VIEWER_TOKEN_TTL_S)).to_jwt()


class _Server(Protocol):
    api_key: str
    api_secret: str
    viewer_room: str | None


class ViewerRoutes:
    """Adds /viewer/… to an app; no tokens are minted while `server.viewer_room` is None."""

    def __init__(self, server: _Server) -> None:
        self.server = server

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/viewer", self._redirect)
        app.router.add_get("/viewer/token", self._token)
        app.router.add_get("/viewer/{name:[a-z.-]*}", self._file)

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        # relative URLs in the page (viewer.js, token) need the trailing slash
        raise web.HTTPFound("/viewer/" + (f"?{request.query_string}" if request.query_string else ""))

    async def _file(self, request: web.Request) -> web.StreamResponse:
        entry = _FILES.get(request.match_info["name"])
        if entry is None:
            raise web.HTTPNotFound(text="no such file in the viewer")
        path, content_type = entry
        if not path.is_file():
            raise web.HTTPNotFound(text=missing_client_help())
        return web.FileResponse(
            path, headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
        )

    async def _token(self, request: web.Request) -> web.Response:
        server, room = self.server, self.server.viewer_room
        if room is None:
            raise web.HTTPNotFound(
                text="this server mints no viewer tokens: open the page with ?url=…&token=…"
            )
        body = {"room": room, "token": viewer_token(server.api_key, server.api_secret, room)}
        return web.Response(text=json.dumps(body), content_type="application/json")
