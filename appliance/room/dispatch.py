"""A conversation agent for each visitor: LiveKit explicit dispatch, driven by presence.

LiveKit's automatic dispatch starts an agent once, when a room is created; a kiosk keeps its
room open for months. So the kiosk asks for an agent itself: AgentDispatchService.CreateDispatch
(``[agent] name``, its room, ``[agent] metadata`` plus the kiosk's avatar and visitor
identities) when a visit starts, DeleteDispatch when it ends (the server then terminates the
agent's job and it leaves). ``[agent] dispatch``:

* ``presence``: one dispatch per visit (never two at once); an agent that leaves while the visit
  goes on is replaced by a fresh dispatch;
* ``always``: one dispatch all the time, replaced whenever its agent leaves;
* ``off``, or no ``[agent] name``: nothing here (automatic dispatch, or an operator's own).

The Twirp calls carry a token with ``roomAdmin`` for the kiosk's room only, minted from the
kiosk's credentials (or fetched from token_url with ``grant=room_admin``), short-lived.
Whether the agent came is read from the room: the conversation agent the kiosk serves
(``room/agent.py``) after the dispatch. None within ``[agent] join_timeout_s``: a problem that
names the agent_name and the fix; presence keeps being tracked and the kiosk keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message
from livekit.protocol import agent_dispatch

from appliance.auth import TokenError, TokenSource
from appliance.config.schema import AgentSection
from appliance.retry import Backoff
from appliance.room import server_api
from appliance.status.problems import ProblemOwner

__all__ = ["Conversation", "DispatchError"]

log = logging.getLogger("appliance.room.dispatch")

CHECK_S = 0.25  # how often the wanted and the actual state are compared


class DispatchError(Exception):
    pass


class Conversation:
    """Keeps the room's dispatch in line with presence; ``run()`` until cancelled."""

    def __init__(self, agent: AgentSection, *, url: str, room: str, avatar: str, visitor: str,
                 tokens: TokenSource | None, problems: ProblemOwner,
                 served_agent: Callable[[], str | None], on_change: Callable[[], None] = lambda: None) -> None:
        self.settings = agent
        self._url = url
        self._room, self._avatar, self._visitor = room, avatar, visitor
        self._tokens = tokens
        self._problems = problems
        self._served_agent = served_agent
        self._on_change = on_change
        self.wanted = agent.dispatch == "always"
        self.state = "idle"  # idle | dispatching | waiting for the agent | talking | ending
        self.dispatch_id: str | None = None
        self.dispatched_at: float | None = None  # monotonic
        self.agent: str | None = None  # the identity of the agent that came for our dispatch
        self.agent_came_s: float | None = None  # dispatch → agent in the room
        self.conversations = 0
        self.last_conversation_s: float | None = None
        self._talking_since: float | None = None
        self._before: str | None = None  # the agent served when we dispatched (not ours)
        self._wake = asyncio.Event()

    @property
    def active(self) -> bool:
        return bool(self.settings.name) and self.settings.dispatch != "off"

    def visit(self, started: bool) -> None:
        """Presence: a visit started or ended (ignored with dispatch = always / off)."""
        if self.settings.dispatch == "presence":
            self.wanted = started
            self._wake.set()

    def describe(self) -> str:
        if not self.settings.name:
            return "no [agent] name: the server's automatic dispatch decides (one agent when the room is created)"
        if self.settings.dispatch == "off":
            return f"[agent] dispatch = off: agent {self.settings.name!r} is not dispatched by the kiosk"
        return f"agent {self.settings.name!r} dispatched {'for each visitor' if self.settings.dispatch == 'presence' else 'always'}"

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        if not self.active:
            log.info("conversation: %s", self.describe())
            return
        log.info("conversation: %s", self.describe())
        backoff = Backoff(first_s=1.0, max_s=30.0, jitter=0.2)
        try:
            while True:
                try:
                    await self._step()
                    backoff.reset()
                except (DispatchError, TokenError) as exc:
                    delay = backoff.next_delay()
                    line = exc.operator_line() if isinstance(exc, TokenError) else str(exc)
                    log.warning("conversation: %s; retrying in %.0f s", line, delay)
                    self._problems.report(f"{line}; retrying in {delay:.0f} s", subject="dispatch",
                                          setting="[agent] name",
                                          fix="check [livekit] credentials (roomAdmin for the room) and the server")
                    await asyncio.sleep(delay)
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), CHECK_S)
                except TimeoutError:
                    pass
        finally:
            if self.dispatch_id is not None:
                try:  # the agent must not stay behind in the room
                    await asyncio.shield(self._end("the kiosk is stopping"))
                except (DispatchError, TokenError) as exc:
                    log.warning("conversation: could not delete dispatch %s on the way out: %s",
                                self.dispatch_id, exc)

    async def _step(self) -> None:
        served = self._served_agent()
        if self.dispatch_id is None:
            if self.wanted:
                await self._create()
            return
        if not self.wanted:
            await self._end("the visit ended")
            return
        if self.agent is None:
            if served is not None and served != self._before:
                self._came(served)
            elif self.dispatched_at is not None and time.monotonic() - self.dispatched_at > self.settings.join_timeout_s:
                self._no_agent_yet()
        elif served != self.agent:
            log.info("conversation: agent %s left while wanted: dispatching a fresh one", self.agent)
            await self._end(f"agent {self.agent} left")

    def _came(self, identity: str) -> None:
        assert self.dispatched_at is not None
        self.agent, self.state = identity, "talking"
        self.agent_came_s = time.monotonic() - self.dispatched_at
        self._talking_since = time.monotonic()
        self.conversations += 1
        self._problems.dismiss("agent")
        log.info("conversation: agent %s joined %.2f s after the dispatch", identity, self.agent_came_s,
                 extra={"agent": identity, "dispatch_id": self.dispatch_id,
                        "agent_came_s": round(self.agent_came_s, 3)})
        self._on_change()

    def _no_agent_yet(self) -> None:
        waited = time.monotonic() - (self.dispatched_at or time.monotonic())
        self._problems.report(
            f"dispatch {self.dispatch_id} for agent {self.settings.name!r} was created {waited:.0f} s ago,"
            " but no agent joined", subject="agent", setting="[agent] name",
            fix=f"start an agent worker registered with agent_name {self.settings.name!r} on this"
                " LiveKit server, or correct [agent] name")

    async def _create(self) -> None:
        self.state = "dispatching"
        fields = json.loads(self.settings.metadata) if self.settings.metadata else {}
        fields.update(kiosk_avatar=self._avatar, kiosk_visitor=self._visitor)
        request = agent_dispatch.CreateAgentDispatchRequest(
            agent_name=self.settings.name, room=self._room, metadata=json.dumps(fields))
        self._before = self._served_agent()
        answer = await self._call("CreateDispatch", request, agent_dispatch.AgentDispatch())
        assert isinstance(answer, agent_dispatch.AgentDispatch)
        self.dispatch_id, self.dispatched_at, self.agent = answer.id, time.monotonic(), None
        self.state = "waiting for the agent"
        self._problems.dismiss("dispatch")
        log.info("conversation: dispatch %s created for agent %r", answer.id, self.settings.name,
                 extra={"dispatch_id": answer.id, "agent_name": self.settings.name})
        self._on_change()

    async def _end(self, why: str) -> None:
        dispatch_id, self.state = self.dispatch_id, "ending"
        try:
            await self._call("DeleteDispatch", agent_dispatch.DeleteAgentDispatchRequest(
                dispatch_id=dispatch_id, room=self._room), agent_dispatch.AgentDispatch())
        except DispatchError as exc:
            if "not_found" not in str(exc):  # already gone (the room closed): nothing to delete
                raise
        if self._talking_since is not None:
            self.last_conversation_s = time.monotonic() - self._talking_since
        log.info("conversation: dispatch %s deleted (%s)%s", dispatch_id, why,
                 f" after {self.last_conversation_s:.0f} s of conversation" if self._talking_since else "",
                 extra={"dispatch_id": dispatch_id, "reason": why})
        self.dispatch_id = self.agent = self.dispatched_at = self._talking_since = None
        self.state = "idle"
        self._problems.dismiss("agent")
        self._on_change()

    async def _call(self, method: str, request: Message, answer: Message) -> Message:
        assert self._tokens is not None
        try:
            return await server_api.call(self._url, "AgentDispatchService/" + method, self._tokens, request, answer)
        except server_api.ServerApiError as exc:
            raise DispatchError(str(exc)) from None

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.settings.dispatch if self.settings.name else "automatic",
            "summary": self.describe(),
            "agent_name": self.settings.name or None,
            "state": self.state if self.active else "off",
            "dispatch_id": self.dispatch_id,
            "agent": self.agent,
            "waiting_s": (round(time.monotonic() - self.dispatched_at, 1)
                          if self.dispatched_at is not None and self.agent is None else None),
            "agent_came_s": round(self.agent_came_s, 3) if self.agent_came_s is not None else None,
            "conversations": self.conversations,
            "last_conversation_s": round(self.last_conversation_s, 1) if self.last_conversation_s is not None else None,
        }
