"""Twirp server APIs of the dev server: `RoomService` and `AgentDispatchService`.

``POST /twirp/livekit.<Service>/<Method>`` with a protobuf (``application/protobuf``, what
`livekit-api` sends) or JSON body, ``Authorization: Bearer <JWT>``; errors are Twirp's
JSON ``{"code", "msg"}`` with its HTTP status. The grant checks are livekit-server's
(``pkg/service/auth.go``): ``roomCreate`` to create or delete rooms, ``roomList`` to list
them, ``roomAdmin`` *for that room* for everything about one room (participants,
subscriptions, agent dispatches).

Only what LiveKit Agents and the kiosk call is here: ListRooms, CreateRoom, DeleteRoom,
ListParticipants, GetParticipant, RemoveParticipant, UpdateSubscriptions; CreateDispatch,
DeleteDispatch, ListDispatch. Anything else answers ``unimplemented``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import jwt
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from livekit import api
from livekit.api.access_token import Claims
from livekit.protocol import agent_dispatch, models, room, rtc

if TYPE_CHECKING:
    from appliance.dev.server.server import DevServer

log = logging.getLogger(__name__)

PREFIX = "/twirp/livekit."


class TwirpError(Exception):
    STATUS = {"unauthenticated": 401, "permission_denied": 403, "not_found": 404,
              "invalid_argument": 400, "unimplemented": 501, "internal": 500}

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code, self.msg = code, msg

    def response(self) -> web.Response:
        return web.json_response({"code": self.code, "msg": self.msg}, status=self.STATUS[self.code])


def claims_of(request: web.Request, api_key: str, api_secret: str) -> Claims:
    """The verified claims of the request's bearer token (livekit-server: 401 otherwise)."""
    header = request.headers.get("Authorization", "")
    token = header[len("Bearer "):] if header.startswith("Bearer ") else ""
    if not token:
        raise TwirpError("unauthenticated", "no authorization header: pass 'Authorization: Bearer <token>'")
    try:
        return api.TokenVerifier(api_key, api_secret).verify(token)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise TwirpError("unauthenticated", f"invalid token: {exc}") from exc


def require_admin(claims: Claims, room_name: str) -> None:
    video = claims.video or api.VideoGrants()
    if not video.room_admin or (video.room and video.room != room_name) or not room_name:
        raise TwirpError("permission_denied", f"permissions denied: needs roomAdmin for room {room_name!r}")


def require(claims: Claims, grant: str) -> None:
    video = claims.video or api.VideoGrants()
    if not getattr(video, grant):
        raise TwirpError("permission_denied", f"permissions denied: needs the {grant} grant")


Handler = Callable[[Claims, Any], Awaitable[Message]]


class TwirpRoutes:
    """Decodes, checks and answers Twirp calls; the room and agent logic is the server's."""

    def __init__(self, server: DevServer) -> None:
        self.server = server
        agents = server.agents
        self.methods: dict[str, tuple[type[Message], Handler]] = {
            "RoomService/ListRooms": (room.ListRoomsRequest, self._list_rooms),
            "RoomService/CreateRoom": (room.CreateRoomRequest, self._create_room),
            "RoomService/DeleteRoom": (room.DeleteRoomRequest, self._delete_room),
            "RoomService/ListParticipants": (room.ListParticipantsRequest, self._list_participants),
            "RoomService/GetParticipant": (room.RoomParticipantIdentity, self._get_participant),
            "RoomService/RemoveParticipant": (room.RoomParticipantIdentity, self._remove_participant),
            "RoomService/UpdateSubscriptions": (room.UpdateSubscriptionsRequest, self._update_subscriptions),
            "AgentDispatchService/CreateDispatch": (agent_dispatch.CreateAgentDispatchRequest,
                                                    agents.create_dispatch_call),
            "AgentDispatchService/DeleteDispatch": (agent_dispatch.DeleteAgentDispatchRequest,
                                                    agents.delete_dispatch_call),
            "AgentDispatchService/ListDispatch": (agent_dispatch.ListAgentDispatchRequest,
                                                  agents.list_dispatch_call),
        }

    def add_to(self, app: web.Application) -> None:
        app.router.add_post(PREFIX + "{service}/{method}", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        name = f"{request.match_info['service']}/{request.match_info['method']}"
        as_json = request.content_type == "application/json"
        try:
            if name not in self.methods:
                raise TwirpError("unimplemented", f"the dev server does not implement livekit.{name}")
            message_type, handler = self.methods[name]
            claims = claims_of(request, self.server.api_key, self.server.api_secret)
            body = await request.read()
            try:
                req = json_format.Parse(body or b"{}", message_type()) if as_json else message_type.FromString(body)
            except (json_format.ParseError, DecodeError) as exc:
                raise TwirpError("invalid_argument", f"cannot decode the {message_type.__name__}: {exc}") from exc
            answer = await handler(claims, req)
        except TwirpError as exc:
            log.info("twirp %s refused: %s", name, exc.msg)
            return exc.response()
        if as_json:
            return web.Response(text=json_format.MessageToJson(answer, preserving_proto_field_name=True),
                                content_type="application/json")
        return web.Response(body=answer.SerializeToString(), content_type="application/protobuf")

    # -- RoomService -------------------------------------------------------------------

    async def _list_rooms(self, claims: Claims, req: room.ListRoomsRequest) -> Message:
        require(claims, "room_list")
        rooms = [r for name, r in sorted(self.server.rooms.items()) if not req.names or name in req.names]
        return room.ListRoomsResponse(rooms=[r.info() for r in rooms])

    async def _create_room(self, claims: Claims, req: room.CreateRoomRequest) -> Message:
        require(claims, "room_create")
        if not req.name:
            raise TwirpError("invalid_argument", "a room needs a name")
        created = self.server.open_room(req.name, req)
        return created.info()

    async def _delete_room(self, claims: Claims, req: room.DeleteRoomRequest) -> Message:
        require(claims, "room_create")
        target = self.server.rooms.get(req.room)
        if target is None:
            raise TwirpError("not_found", f"room {req.room!r} does not exist")
        await self.server.close_room(target, "deleted through RoomService.DeleteRoom")
        return room.DeleteRoomResponse()

    def _room(self, claims: Claims, name: str) -> Any:
        require_admin(claims, name)
        found = self.server.rooms.get(name)
        if found is None:
            raise TwirpError("not_found", f"room {name!r} does not exist")
        return found

    async def _list_participants(self, claims: Claims, req: room.ListParticipantsRequest) -> Message:
        target = self._room(claims, req.room)
        return room.ListParticipantsResponse(
            participants=[p.info() for p in target.participants.values() if not p.grant.hidden])

    def _participant(self, claims: Claims, req: room.RoomParticipantIdentity) -> Any:
        found = self._room(claims, req.room).participants.get(req.identity)
        if found is None:
            raise TwirpError("not_found", f"participant {req.identity!r} is not in room {req.room!r}")
        return found

    async def _get_participant(self, claims: Claims, req: room.RoomParticipantIdentity) -> Message:
        return self._participant(claims, req).info()  # type: ignore[no-any-return]

    async def _remove_participant(self, claims: Claims, req: room.RoomParticipantIdentity) -> Message:
        participant = self._participant(claims, req)
        if participant.session is not None:
            await participant.session.close(rtc.LeaveRequest(
                reason=models.DisconnectReason.PARTICIPANT_REMOVED, action=rtc.LeaveRequest.Action.DISCONNECT))
        return room.RemoveParticipantResponse()

    async def _update_subscriptions(self, claims: Claims, req: room.UpdateSubscriptionsRequest) -> Message:
        participant = self._participant(
            claims, room.RoomParticipantIdentity(room=req.room, identity=req.identity))
        if participant.session is not None:
            await participant.session.update_subscription(list(req.track_sids), req.subscribe)
        return room.UpdateSubscriptionsResponse()
