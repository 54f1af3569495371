"""The HTTP side of the dev server: routes, authentication, start and stop.

Routes, as the livekit SDKs use them:

* `GET /rtc/v1` and `GET /rtc/v1/validate` -> 404, as on a livekit-server older than
  the single-PeerConnection protocol: we serve only the classic two-PeerConnection
  one.  Newer SDKs try `/rtc/v1` first.  The Rust SDK (Python `livekit`) falls back
  on the 404 of the WebSocket upgrade; a browser cannot see that status, so
  `livekit-client` asks `/rtc/v1/validate` and falls back to `/rtc` on its 404
  (any other answer, or one it may not read for lack of CORS, fails the connect).
* `GET /rtc` (WebSocket) -> the signalling session.  Token in
  `Authorization: Bearer` (or `?access_token=`).  `?reconnect=1` (a resume) is
  answered with a LeaveRequest(RECONNECT): we keep no state to resume from, so the
  SDK falls back to a full reconnect (new join, tracks republished).
* `GET /rtc/validate` -> 200, or 401 with the reason; the SDK calls it after a
  failed connect and puts that text in its error.
* `GET /viewer/` -> a page that watches the room in a browser (see `viewer.py`).
* `POST /twirp/livekit.RoomService/*` and `livekit.AgentDispatchService/*` -> the server
  APIs `livekit-api` and LiveKit Agents call (see `twirp.py`).
* `GET /agent` (WebSocket) -> LiveKit Agents workers register and get jobs (see `agents.py`).

Rooms are created by the first join, by RoomService.CreateRoom or by a dispatch, and
closed as livekit-server closes them: ``empty_timeout`` after creation if nobody joined,
``departure_timeout`` after the last participant who is not an agent left (agents alone
do not keep a room open). Closing disconnects everyone with ROOM_CLOSED and ends the
room's agent jobs.

Every answer carries CORS headers for any origin, and preflight `OPTIONS` requests
are answered for every path, like livekit-server (its tokens, not origins, decide
who may join): pages served elsewhere (a kiosk screen, LiveKit Meet, the agents
playground) must be able to read our answers.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from aiohttp import web
from livekit.protocol import models, rtc
from livekit.protocol import room as room_pb

from appliance.dev.server import auth
from appliance.dev.server.agents import Agents
from appliance.dev.server.room import Participant, Room
from appliance.dev.server.session import PING_INTERVAL, PING_TIMEOUT, ParticipantSession
from appliance.dev.server.twirp import TwirpRoutes
from appliance.dev.server.viewer import ViewerRoutes

log = logging.getLogger(__name__)


CORS_MAX_AGE_S = 86400  # livekit-server lets browsers cache a preflight for a day


@web.middleware
async def _preflight(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """Answer CORS preflights on any path, before routing can call them 404 or 405."""
    method = request.headers.get("Access-Control-Request-Method")
    if request.method != "OPTIONS" or not method:
        return await handler(request)
    headers = {
        "Access-Control-Allow-Methods": method.upper(),
        "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }
    wanted = request.headers.get("Access-Control-Request-Headers")
    if wanted:
        headers["Access-Control-Allow-Headers"] = wanted  # any header, as livekit-server
    return web.Response(status=204, headers=headers)


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare: runs for every answer, WebSocket upgrades and errors included
    response.headers["Access-Control-Allow-Origin"] = request.headers.get("Origin", "*")
    response.headers["Access-Control-Expose-Headers"] = "*"
    if "Origin" in request.headers and "Vary" not in response.headers:
        response.headers["Vary"] = "Origin"


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query.get("access_token")


class DevServer:
    """A small LiveKit-compatible SFU for development and tests.

    >>> server = DevServer(host="10.213.0.1", port=7880, api_key="devkey", api_secret="...")
    >>> await server.start()     # listening; server.url == "ws://10.213.0.1:7880"
    >>> server.participants("room")
    >>> await server.stop()      # every connection and PC closed, port free again

    `port=0` picks a free port (see `server.port` after `start()`); `start()` may be
    called again after `stop()`, on the same port, to simulate an outage.
    With `viewer_room`, `/viewer/token` hands the browser viewer a watch-only token
    for that room (`viewer_url` is the page to open).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7880,
        api_key: str = "devkey",
        api_secret: str = "",
        viewer_room: str | None = None,
    ) -> None:
        if not api_secret:
            raise ValueError("api_secret must not be empty")
        self.host = host
        self.port = port
        self.api_key = api_key
        self.api_secret = api_secret
        self.viewer_room = viewer_room
        self.rooms: dict[str, Room] = {}
        self._runner: web.AppRunner | None = None
        self._sessions: set[ParticipantSession] = set()
        self._session_tasks: set[asyncio.Task] = set()
        self.agents = Agents(self)
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def viewer_url(self) -> str:
        return "http" + self.url[2:] + "/viewer/"

    def participants(self, room: str) -> list[str]:
        """Identities currently joined to `room`."""
        r = self.rooms.get(room)
        return sorted(r.participants) if r else []

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("DevServer already started")
        app = web.Application(middlewares=[_preflight])
        app.on_response_prepare.append(_cors_headers)
        app.router.add_get("/rtc/v1", self._not_found)
        app.router.add_get("/rtc/v1/validate", self._not_found)
        app.router.add_get("/rtc/validate", self._validate)
        app.router.add_get("/rtc", self._signal)
        app.router.add_get("/", self._health)
        ViewerRoutes(self).add_to(app)
        TwirpRoutes(self).add_to(app)
        self.agents.add_to(app)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        if self.port == 0:
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            for sock in sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    self.port = sock.getsockname()[1]
                    break
        self._runner = runner
        log.info("LiveKit dev server listening on %s", self.url)

    async def stop(self) -> None:
        """Drop every client abruptly (like a crashed server) and free the port."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        sessions = list(self._sessions)
        await asyncio.gather(
            *(s.ws.close(code=1001, message=b"server stopping") for s in sessions),
            return_exceptions=True,
        )
        for session in sessions:
            await session.close()
        tasks = list(self._session_tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await runner.shutdown()
        await runner.cleanup()
        for room in self.rooms.values():
            if room.closing is not None:
                room.closing.cancel()
        self.rooms.clear()
        self.agents.dispatches.clear()
        log.info("LiveKit dev server on %s stopped", self.url)

    async def __aenter__(self) -> DevServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- rooms: created on the first join or by RoomService, closed as livekit-server does --

    def open_room(self, name: str, create: room_pb.CreateRoomRequest | None = None) -> Room:
        """The room ``name``, created (with its agent dispatches) if it does not exist."""
        existing = self.rooms.get(name)
        if existing is not None:
            return existing
        create = create or room_pb.CreateRoomRequest(name=name)
        room = self.rooms[name] = Room(name=name, empty_timeout=create.empty_timeout or 300,
                                       departure_timeout=create.departure_timeout or 20,
                                       metadata=create.metadata)
        log.info("room %s created", name)
        self.agents.room_created(room, list(create.agents))
        self._close_later(room, room.empty_timeout, "nobody joined")
        return room

    def _close_later(self, room: Room, after_s: float, why: str) -> None:
        if room.closing is not None:
            room.closing.cancel()

        def close() -> None:
            room.closing = None
            if not room.keeps_open() and self.rooms.get(room.name) is room:
                task = asyncio.get_running_loop().create_task(self.close_room(room, why))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

        room.closing = asyncio.get_running_loop().call_later(after_s, close)

    def _room_joined(self, room: Room) -> None:
        if room.keeps_open() and room.closing is not None:
            room.closing.cancel()
            room.closing = None

    def _room_emptied(self, room: Room) -> None:
        """A participant left: with none but agents left, close after departure_timeout."""
        if not room.keeps_open() and room.closing is None and self.rooms.get(room.name) is room:
            left = "only agents are left" if room.participants else "everyone left"
            self._close_later(room, room.departure_timeout, f"{left} {room.departure_timeout} s ago")

    async def close_room(self, room: Room, why: str) -> None:
        """Disconnect everyone (ROOM_CLOSED), end the room's agent jobs, forget the room."""
        if self.rooms.get(room.name) is room:
            del self.rooms[room.name]
        if room.closing is not None:
            room.closing.cancel()
            room.closing = None
        log.info("room %s closed: %s", room.name, why)
        leave = rtc.LeaveRequest(reason=models.DisconnectReason.ROOM_CLOSED,
                                 action=rtc.LeaveRequest.Action.DISCONNECT)
        for participant in list(room.participants.values()):
            if participant.session is not None:
                await participant.session.close(leave)
        await self.agents.room_closed(room)

    # -- handlers ---------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _not_found(self, request: web.Request) -> web.Response:
        # Make the SDKs fall back from /rtc/v1 (single PC) to /rtc (two PCs).  The text
        # must not say "requested room does not exist": livekit-client would give up.
        return web.Response(status=404, text="single peer connection signalling not supported")

    async def _validate(self, request: web.Request) -> web.Response:
        try:
            auth.verify(_token(request), self.api_key, self.api_secret)
        except auth.AuthError as exc:
            return web.Response(status=401, text=str(exc))
        return web.Response(text="success")

    async def _signal(self, request: web.Request) -> web.StreamResponse:
        try:
            grant = auth.verify(_token(request), self.api_key, self.api_secret)
        except auth.AuthError as exc:
            log.warning("refused connection from %s: %s", request.remote, exc)
            return web.Response(status=401, text=str(exc))

        # The SDK pings every PING_INTERVAL s: silence for longer than its own ping
        # timeout means the client is gone without closing (e.g. its network died).
        ws = web.WebSocketResponse(
            heartbeat=None,
            receive_timeout=PING_TIMEOUT + PING_INTERVAL,
            timeout=2.0,  # close handshake
            max_msg_size=16 * 1024 * 1024,
        )
        await ws.prepare(request)

        if request.query.get("reconnect") == "1":
            # Nothing to resume (we restarted, or the session is gone): ask for a full
            # reconnect, which the SDK then does with a fresh join.
            leave = rtc.LeaveRequest(
                can_reconnect=True,
                reason=models.DisconnectReason.STATE_MISMATCH,
                action=rtc.LeaveRequest.Action.RECONNECT,
            )
            await ws.send_bytes(rtc.SignalResponse(leave=leave).SerializeToString())
            await ws.close()
            return ws

        room = self.open_room(grant.room)
        old = room.participants.get(grant.identity)
        if old is not None and old.session is not None:
            # Same identity joining again: the newcomer wins, as in livekit-server.
            await old.session.close(
                rtc.LeaveRequest(
                    reason=models.DisconnectReason.DUPLICATE_IDENTITY,
                    action=rtc.LeaveRequest.Action.DISCONNECT,
                )
            )
        participant = Participant(
            grant=grant,
            client_protocol=_int(request.query.get("client_protocol")),
            protocol=_int(request.query.get("protocol")),
            firefox=request.query.get("browser", "").lower() == "firefox",
            auto_subscribe=request.query.get("auto_subscribe", "1").lower() not in ("0", "false"),
        )
        # The room may have been closed while the old session closed.
        room = self.open_room(grant.room)
        room.participants[grant.identity] = participant
        self._room_joined(room)
        session = ParticipantSession(self, ws, room, participant)
        log.info("%s joined %s as %s", grant.identity, room.name, participant.sid)

        self._sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self._session_tasks.add(task)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            if task is not None:
                self._session_tasks.discard(task)
        return ws
