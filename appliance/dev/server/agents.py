"""Agent workers and dispatch in the dev server, as livekit-server does them.

An unmodified LiveKit Agents worker (`python agent.py start`, with LIVEKIT_URL and the API
key and secret of this server) opens ``GET /agent`` (Bearer JWT with the ``agent`` grant)
and speaks `livekit_agent.proto` in binary frames: ``register`` first (answered with the
worker's id before anything else), ``update_worker`` with its status and load every 2.5 s,
and ``update_job`` for the jobs it runs.

A *dispatch* asks for one agent in one room. It is made by AgentDispatchService.CreateDispatch
(explicit dispatch: workers registered with that ``agent_name``), or, when a room is created
without any, one with the empty name (automatic dispatch: workers without an agent_name), so
an automatic agent comes once per room, at its creation, as with livekit-server. A dispatch
launches one job at once: the least loaded available worker with its agent_name is asked
(``availability``); the first that accepts gets an ``assignment`` with a join token minted
here (kind agent, that room, the identity and attributes it answered) and joins over
``/rtc``. No worker, or none accepting: the dispatch stays with no job, and the log says
why (livekit-server does not retry either). DeleteDispatch, and the room closing, send each
of its jobs' workers a ``termination``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from aiohttp import WSMsgType, web
from livekit import api
from livekit.api.access_token import Claims
from livekit.protocol import agent, agent_dispatch, models

from appliance.dev.server.room import new_sid
from appliance.dev.server.twirp import TwirpError, claims_of, require_admin

if TYPE_CHECKING:
    from appliance.dev.server.room import Room
    from appliance.dev.server.server import DevServer

log = logging.getLogger(__name__)

AVAILABILITY_TIMEOUT_S = 5.0  # a worker that does not answer is skipped
JOB_TOKEN_TTL = datetime.timedelta(hours=6)


@dataclass
class Worker:
    id: str
    agent_name: str
    ws: web.WebSocketResponse
    status: int = agent.WS_AVAILABLE
    load: float = 0.0
    jobs: dict[str, agent.Job] = field(default_factory=dict)
    answers: dict[str, asyncio.Future[agent.AvailabilityResponse]] = field(default_factory=dict)

    async def send(self, message: agent.ServerMessage) -> None:
        with contextlib.suppress(ConnectionResetError, RuntimeError):  # the worker is gone
            await self.ws.send_bytes(message.SerializeToString())


@dataclass
class Dispatch:
    info: agent_dispatch.AgentDispatch

    @property
    def jobs(self) -> list[agent.Job]:
        return list(self.info.state.jobs)


class Agents:
    """The workers connected to this server and the dispatches of its rooms."""

    def __init__(self, server: DevServer) -> None:
        self.server = server
        self.workers: dict[str, Worker] = {}
        self.dispatches: dict[str, Dispatch] = {}  # by id
        self._tasks: set[asyncio.Task[None]] = set()

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/agent", self.serve_worker)

    def registered(self, agent_name: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.agent_name == agent_name]

    # -- dispatches --------------------------------------------------------------------

    def create_dispatch(self, room: Room, agent_name: str, metadata: str = "",
                        attributes: dict[str, str] | None = None) -> Dispatch:
        info = agent_dispatch.AgentDispatch(
            id=new_sid("AD"), agent_name=agent_name, room=room.name, metadata=metadata,
            attributes=attributes or {},
            state=agent_dispatch.AgentDispatchState(created_at=time.time_ns()))
        dispatch = self.dispatches[info.id] = Dispatch(info)
        log.info("dispatch %s: agent %r to room %s", info.id, agent_name, room.name)
        self._spawn(self._launch(dispatch, room))
        return dispatch

    async def delete_dispatch(self, dispatch: Dispatch, why: str) -> None:
        self.dispatches.pop(dispatch.info.id, None)
        dispatch.info.state.deleted_at = time.time_ns()
        for job in dispatch.jobs:
            await self._terminate(job, why)
        log.info("dispatch %s deleted (%s)", dispatch.info.id, why)

    def room_created(self, room: Room, explicit: list[agent_dispatch.RoomAgentDispatch]) -> None:
        # livekit-server: "by default, start any agent in the empty JobName"
        for wanted in explicit or [agent_dispatch.RoomAgentDispatch(agent_name="")]:
            self.create_dispatch(room, wanted.agent_name, wanted.metadata, dict(wanted.attributes))

    async def room_closed(self, room: Room) -> None:
        for dispatch in [d for d in self.dispatches.values() if d.info.room == room.name]:
            await self.delete_dispatch(dispatch, f"room {room.name} closed")

    async def _launch(self, dispatch: Dispatch, room: Room) -> None:
        info = dispatch.info
        job = agent.Job(id=new_sid("AJ"), dispatch_id=info.id, type=agent.JT_ROOM, room=room.info(),
                        agent_name=info.agent_name, metadata=info.metadata,
                        state=agent.JobState(status=agent.JS_PENDING, updated_at=time.time_ns()))
        candidates = sorted((w for w in self.registered(info.agent_name) if w.status == agent.WS_AVAILABLE),
                            key=lambda w: w.load)
        if not candidates:
            if info.agent_name:
                log.warning("dispatch %s: no agent worker named %r is registered; no agent joins room %s",
                            info.id, info.agent_name, room.name)
            else:  # nobody asked for it: most rooms have no automatic agent
                log.info("room %s: no agent worker for automatic dispatch is registered", room.name)
            return
        for worker in candidates:
            answer = await self._ask(worker, job)
            if answer is None or not answer.available:
                continue
            if self.dispatches.get(info.id) is not dispatch:
                return  # deleted while the worker answered
            identity = answer.participant_identity or f"agent-{job.id}"
            job.state.participant_identity = identity
            job.state.worker_id = worker.id
            worker.jobs[job.id] = job
            info.state.jobs.append(job)
            token = self._job_token(room.name, identity, answer)
            await worker.send(agent.ServerMessage(assignment=agent.JobAssignment(job=job, token=token)))
            log.info("dispatch %s: job %s on worker %s joins %s as %s", info.id, job.id, worker.id,
                     room.name, identity)
            return
        log.warning("dispatch %s: no registered worker accepted the job", info.id)

    async def _ask(self, worker: Worker, job: agent.Job) -> agent.AvailabilityResponse | None:
        answer = asyncio.get_running_loop().create_future()
        worker.answers[job.id] = answer
        try:
            await worker.send(agent.ServerMessage(availability=agent.AvailabilityRequest(job=job)))
            return await asyncio.wait_for(answer, AVAILABILITY_TIMEOUT_S)
        except TimeoutError:
            log.warning("worker %s did not answer the availability of job %s", worker.id, job.id)
            return None
        finally:
            worker.answers.pop(job.id, None)

    def _job_token(self, room: str, identity: str, answer: agent.AvailabilityResponse) -> str:
        grants = api.VideoGrants(room_join=True, room=room, agent=True, can_publish=True,
                                 can_subscribe=True, can_publish_data=True, can_update_own_metadata=True)
        return (api.AccessToken(self.server.api_key, self.server.api_secret)
                .with_identity(identity).with_name(answer.participant_name or identity)
                .with_kind("agent").with_grants(grants).with_metadata(answer.participant_metadata)
                .with_attributes(dict(answer.participant_attributes)).with_ttl(JOB_TOKEN_TTL).to_jwt())

    async def _terminate(self, job: agent.Job, why: str) -> None:
        worker = self.workers.get(job.state.worker_id)
        if worker is not None and worker.jobs.pop(job.id, None) is not None:
            log.info("job %s: terminating (%s)", job.id, why)
            await worker.send(agent.ServerMessage(termination=agent.JobTermination(job_id=job.id)))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- AgentDispatchService (Twirp) --------------------------------------------------

    async def create_dispatch_call(self, claims: Claims,
                                   req: agent_dispatch.CreateAgentDispatchRequest) -> agent_dispatch.AgentDispatch:
        require_admin(claims, req.room)
        room = self.server.open_room(req.room)
        return self.create_dispatch(room, req.agent_name, req.metadata, dict(req.attributes)).info

    async def delete_dispatch_call(self, claims: Claims,
                                   req: agent_dispatch.DeleteAgentDispatchRequest) -> agent_dispatch.AgentDispatch:
        require_admin(claims, req.room)
        dispatch = self.dispatches.get(req.dispatch_id)
        if dispatch is None or dispatch.info.room != req.room:
            raise TwirpError("not_found", f"no dispatch {req.dispatch_id!r} in room {req.room!r}")
        await self.delete_dispatch(dispatch, "DeleteDispatch")
        return dispatch.info

    async def list_dispatch_call(self, claims: Claims,
                                 req: agent_dispatch.ListAgentDispatchRequest) -> agent_dispatch.ListAgentDispatchResponse:
        require_admin(claims, req.room)
        found = [d.info for d in self.dispatches.values()
                 if d.info.room == req.room and req.dispatch_id in ("", d.info.id)]
        return agent_dispatch.ListAgentDispatchResponse(agent_dispatches=found)

    # -- the /agent WebSocket ----------------------------------------------------------

    async def serve_worker(self, request: web.Request) -> web.StreamResponse:
        try:
            claims = claims_of(request, self.server.api_key, self.server.api_secret)
            if not (claims.video and claims.video.agent):
                raise TwirpError("permission_denied", "permissions denied: a worker needs the agent grant")
        except TwirpError as exc:
            log.warning("refused agent worker from %s: %s", request.remote, exc.msg)
            return web.Response(status=exc.STATUS[exc.code], text=exc.msg)
        ws = web.WebSocketResponse(heartbeat=30.0)
        await ws.prepare(request)
        worker: Worker | None = None
        try:
            async for frame in ws:
                if frame.type != WSMsgType.BINARY:
                    continue
                message = agent.WorkerMessage.FromString(frame.data)
                kind = message.WhichOneof("message")
                if worker is None:
                    if kind != "register":
                        log.warning("agent worker sent %s before register; closing", kind)
                        break
                    worker = await self._register(ws, message.register)
                else:
                    self._on_message(worker, message)
        finally:
            if worker is not None:
                self._unregister(worker)
        return ws

    async def _register(self, ws: web.WebSocketResponse, req: agent.RegisterWorkerRequest) -> Worker:
        worker = Worker(id=new_sid("AW"), agent_name=req.agent_name, ws=ws)
        self.workers[worker.id] = worker
        info = models.ServerInfo(edition=models.ServerInfo.Edition.Standard, version="1.9.0",
                                 protocol=16, node_id="appliance-devserver")
        await worker.send(agent.ServerMessage(
            register=agent.RegisterWorkerResponse(worker_id=worker.id, server_info=info)))
        named = f"agent_name {req.agent_name!r}" if req.agent_name else "no agent_name (automatic dispatch)"
        log.info("agent worker %s registered (%s, livekit-agents %s)", worker.id, named, req.version)
        return worker

    def _on_message(self, worker: Worker, message: agent.WorkerMessage) -> None:
        kind = message.WhichOneof("message")
        if kind == "update_worker":
            if message.update_worker.HasField("status"):
                worker.status = message.update_worker.status
            worker.load = message.update_worker.load
        elif kind == "availability":
            answer = worker.answers.get(message.availability.job_id)
            if answer is not None and not answer.done():
                answer.set_result(message.availability)
        elif kind == "update_job":
            update = message.update_job
            job = worker.jobs.get(update.job_id)
            if job is not None:
                job.state.status = cast(Any, update.status)
                job.state.error = update.error
                job.state.updated_at = time.time_ns()
                if update.status in (agent.JS_SUCCESS, agent.JS_FAILED):
                    job.state.ended_at = time.time_ns()
                    worker.jobs.pop(job.id, None)
                    self._job_in_dispatch(job).CopyFrom(job)
                    log.info("job %s ended (%s)", job.id, agent.JobStatus.Name(update.status))
        elif kind == "ping":
            self._spawn(worker.send(agent.ServerMessage(pong=agent.WorkerPong(
                last_timestamp=message.ping.timestamp, timestamp=int(time.time() * 1000)))))

    def _job_in_dispatch(self, job: agent.Job) -> agent.Job:
        """The dispatch's own copy of ``job`` (protobuf repeated fields hold copies)."""
        dispatch = self.dispatches.get(job.dispatch_id)
        for held in dispatch.info.state.jobs if dispatch else []:
            if held.id == job.id:
                return held
        return agent.Job()

    def _unregister(self, worker: Worker) -> None:
        self.workers.pop(worker.id, None)
        for job in worker.jobs.values():
            job.state.status = agent.JS_FAILED
            job.state.error = "the worker disconnected"
            job.state.ended_at = time.time_ns()
            self._job_in_dispatch(job).CopyFrom(job)
        log.info("agent worker %s disconnected", worker.id)
