"""Run the avatar runtime in a supervised child process (parent side).

A :class:`Renderer` is one child process and the model it renders. Native
avatar code can crash or hang; it does so in the child, and the supervisor
(with its systemd watchdog ping) carries on, restarts the child, and the
frames come back by themselves. Two renderers can exist at once, so a new
model can warm up beside the old one before a switch.

The child speaks the protocol defined in ``protocol.py`` (the ring: ``ring.py``; the child: ``child.py``): handshake
(``Hello``, ``Init`` → ``Opening`` → ``Ready``), then ``FrameReady(slot, seq)``
per frame, the frame itself sitting in a shared-memory ring that the parent
copies out.

Life of a renderer (``State``)::

    STOPPED → STARTING → WARMING → RUNNING ─┬─ child died ──────────→ RESTARTING → WARMING → ...
                                            ├─ no frames (stall) ─→ STALLED → RESTARTING/BACKOFF
                                            └─ repeated failures ─→ BACKOFF → RESTARTING
              WARMING ── model cannot open ─→ FAILED ── slow retry ─→ RESTARTING
    any ── close() → STOPPED

A child counts as running only after its handshake and first frame. On a
stall the parent escalates: ask (``Shutdown``), dump the child's stacks
(SIGUSR1, faulthandler, to stderr), SIGKILL. Restarts back off (0, 1, 2, 4
... ``backoff_max_s``) and the backoff resets after ``healthy_after_s`` of
running; it never gives up. An idle spare child (interpreter and runtime
imports loaded, waiting for ``Init``) is kept ready to take over. A spare is
only an asset if it is proven alive: it is pinged while it waits and replaced
when it stops answering (stopped, OOM-killed, hung in a native import); it is
promoted only if it answered within ``SPARE_ALIVE_S``, and a promoted child
that does not acknowledge ``Init`` within ``HANDSHAKE_TIMEOUT_S`` is killed and
replaced by a fresh one (no backoff: the spare failed, not the model).

Children are spawned (``python -P -m appliance.renderer.child``), never
forked, from the event loop's thread; they die with that thread
(PR_SET_PDEATHSIG), so run the loop in a thread that lives as long as the
renderer (the main thread).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import count

from appliance import runtimes as _runtime_module
from appliance.renderer.process import ChildProcess, exit_reason
from appliance.renderer.protocol import Failure, Init, Interrupt, Message, Ping, PushAudio
from appliance.renderer.protocol import Flush as _FlushMsg
from appliance.renderer.ring import SHM_PREFIX, Ring, sweep_stale_segments
from appliance.retry import Backoff
from appliance.runtimes import Frame, RuntimeFailure, VideoSpec
from appliance.status.states import RendererState, StateCell
from appliance.tasks import TaskOwner, stop_tasks

__all__ = [
    "Renderer",
    "RendererOptions",
    "RendererSpec",
    "RendererCrashed",
    "State",
    "SHM_PREFIX",
    "sweep_stale_segments",
]

log = logging.getLogger("appliance.renderer")

State = RendererState
_FPS_WINDOW_S = 10.0
_PING_EVERY_S = 1.0
_spawn_ids = count(1)
SPARE_NICE = 10  # idle spares start at a lower CPU priority
_SPARE_PING_S = 0.5  # how often an idle spare is asked for a sign of life
SPARE_ALIVE_S = 1.5  # a spare that answered within this long may be promoted
SPARE_DEAD_S = 3.0  # an idle spare silent for this long is replaced
SPARE_HELLO_TIMEOUT_S = 60.0  # a new spare must finish its imports (slow under emulation)
# A spare still importing after that is given twice as long next time, up to this: on an
# overloaded slow device (QEMU TCG, load 8 on 2 CPUs) killing it and starting the imports over
# every 60 s was itself the load that kept the live renderer at 0 fps
SPARE_HELLO_MAX_S = 960.0
HANDSHAKE_TIMEOUT_S = 2.0  # Hello seen, Init sent: the child must answer Opening by then
# A device that renders slower than stall_timeout_s allows (an emulated CPU: 0.6 fps, frame
# intervals of 1.6-2.5 s, measured under QEMU TCG) is slow, not stalled: restarting its child
# cannot make it faster and only starts a long load over, which then starved systemd's
# watchdog. There a stall is this many of its usual (median) frame intervals...
SLOW_STALL_INTERVALS = 5
# ...but never longer than this: under the supervisor's 45 s watchdog grace, so the renderer
# still restarts its own child before systemd restarts everything
SLOW_STALL_MAX_S = 30.0
# Nor is a child that got no CPU: on an overloaded device (a TCG guest at load 8-10 on 2
# CPUs, while a spare and the screen child import) the live child went 7.9 s without a frame
# or a pong and was restarted, which only added a reimport to the load. Silence during which
# the kernel saw tasks waiting for a CPU (PSI, /proc/pressure/cpu) is not counted, up to
# SLOW_STALL_MAX_S of silence in all. System-wide PSI, not the child's own wait
# (/proc/PID/schedstat): that needs CONFIG_SCHED_INFO, which some kernels (our CI host's) lack.
PSI_CPU = "/proc/pressure/cpu"
# Frames received but not yet consumed, at most: a consumer that falls behind (CPU load)
# loses the oldest frames rather than building latency (each frame holds 40 ms of audio).
MAX_BACKLOG = 3


def cpu_wait_s(path: str = PSI_CPU) -> float | None:
    """Seconds since boot in which some runnable task waited for a CPU; None without PSI."""
    try:
        with open(path) as f:
            some = f.readline()  # "some avg10=0.00 avg60=0.00 avg300=0.00 total=1762067654" (µs)
        return int(some.rsplit("total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class RendererSpec:
    runtime: str  # a name from runtime.RUNTIME_NAMES, or "module:factory" (tests)
    model: str
    width: int = 512
    height: int = 512
    api_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RendererOptions:
    """How a renderer is supervised (``[avatar] stall_timeout_s`` is the operator's)."""

    stall_timeout_s: float = 2.0  # no frame for this long: the child is stalled
    spare: bool = True  # keep an idle child ready to take over
    warmup_timeout_s: float = 120.0  # Init to first frame (a bitHuman model loads in ~20 s)
    backoff_max_s: float = 30.0
    healthy_after_s: float = 30.0  # running this long resets the backoff
    failed_retry_s: float = 60.0  # a model that cannot open is retried this often
    start_attempts: int = 3  # crashes before a first frame until start() raises
    shutdown_grace_s: float = 1.0  # asked to stop, then stacks dumped and SIGKILL
    slots: int = 8  # frames in the shared-memory ring


class RendererCrashed(RuntimeFailure):
    """The child kept crashing before it rendered a first frame."""


def _failure_exception(f: Failure) -> RuntimeFailure:
    cls = getattr(_runtime_module, f.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, RuntimeFailure)):
        cls = RuntimeFailure
    return cls(f.message, setting=f.setting, fix=f.fix)


@dataclass
class _Outcome:
    reason: str
    failure: RuntimeFailure | None = None  # the model cannot open: FAILED, not a crash
    stalled: bool = False
    handshake: bool = False  # the child never took the job (stopped or hung before Opening)
    ran_s: float = 0.0  # healthy running time before the end


class Renderer:
    """One supervised renderer child and its model. See the module docstring."""

    def __init__(
        self,
        spec: RendererSpec,
        options: RendererOptions | None = None,
        *,
        name: str = "main",
        on_state: Callable[[State, State, str], None] | None = None,
    ) -> None:
        self.spec, self.name = spec, name
        self.options = options or RendererOptions()
        # 0 s, then 1, 2, 4 ... backoff_max_s; reset after healthy_after_s of running
        self._backoff = Backoff(first_s=1.0, max_s=self.options.backoff_max_s, immediate=True)
        self.restarts = 0
        self.last_restart_reason = ""
        self.failure: RuntimeFailure | None = None  # why the model cannot open (state FAILED)
        # last frame of the old child → first frame of the new one
        self.last_restart_gap_s: float | None = None
        self.last_frame_monotonic: float | None = None
        self.spawned = 0  # children started, spares included
        self.dropped_frames = 0  # consumer too slow, or slot overwritten during the copy
        self.cancelled_frames = 0  # speech frames rendered before an interrupt took effect
        self.video: VideoSpec | None = None
        self._state = StateCell(
            State.STOPPED, logger=log, who=f"renderer {name}", on_change=on_state
        )
        self._current: ChildProcess | None = None
        self._spare: ChildProcess | None = None
        self._children: set[ChildProcess] = set()  # every child not yet retired, whatever its role
        # spare spawns and retirements: named, kept, their crashes logged
        self._helpers = TaskOwner(f"renderer {name}", log)
        self._pending: collections.deque[tuple[ChildProcess, Ring, int, int]] = collections.deque()
        self._frame_event = asyncio.Event()
        self._frame_times: collections.deque[float] = collections.deque()
        self._first_frame_at: float | None = None
        self._frame_intervals: collections.deque[float] = collections.deque(maxlen=9)  # the last ones, for stall_limit_s
        self._slow_said = False  # the slow-device stall limit is logged once
        self._starved_said = False  # likewise a silence excused by CPU starvation
        self._hello_timeout_s = SPARE_HELLO_TIMEOUT_S  # grows on a device that imports slowly
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._closed = False
        self._ever_ran = False

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> State:
        return self._state.value

    @property
    def state_reason(self) -> str:
        return self._state.reason

    @property
    def pid(self) -> int | None:
        return self._current.pid if self._current is not None and self._current.alive else None

    @property
    def fps(self) -> float:
        """Frames per second over the last 10 s (0 when frames stopped)."""
        now = time.monotonic()
        times = self._frame_times
        while times and times[0] < now - _FPS_WINDOW_S:
            times.popleft()
        if not times or self._first_frame_at is None:
            return 0.0
        span = min(_FPS_WINDOW_S, now - self._first_frame_at)
        if span < _FPS_WINDOW_S:
            return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        return len(times) / _FPS_WINDOW_S

    def usual_frame_interval_s(self) -> float | None:
        """The median of the last intervals between two frames of one child (this device's speed,
        kept across restarts; a restart's gap is not one), None before the first."""
        if not self._frame_intervals:
            return None
        intervals = sorted(self._frame_intervals)
        return intervals[len(intervals) // 2]

    def stall_limit_s(self) -> float:
        """No frame for this long is a stall: ``stall_timeout_s``, or on a device whose frames
        usually come further apart than that allows, SLOW_STALL_INTERVALS of its intervals."""
        usual = self.usual_frame_interval_s()
        if usual is None:
            # the first child's second frame: how slow this device is is not known yet
            return max(self.options.stall_timeout_s, SLOW_STALL_MAX_S)
        return max(self.options.stall_timeout_s, min(SLOW_STALL_MAX_S, SLOW_STALL_INTERVALS * usual))

    async def start(self) -> None:
        """Spawn the child, open the model, wait for the first frame.

        Raises the child's RuntimeFailure (with its operator line) if the model
        cannot open, or RendererCrashed if the child crashed ``start_attempts``
        times before a first frame. Either way the renderer keeps retrying in
        the background until close(): call close() if that is not wanted.
        """
        if self._task is not None:
            raise RuntimeError(f"renderer {self.name} already started")
        sweep_stale_segments()
        self._started = asyncio.get_running_loop().create_future()
        self._task = self._helpers.spawn(self._supervise(), "supervise")
        await self._started

    async def frames(self) -> AsyncIterator[Frame]:
        """Frames, forever, across child restarts; ends after close(). One consumer at a time."""
        while True:
            while not self._pending:
                if self._closed:
                    return
                self._frame_event.clear()
                await self._frame_event.wait()
            child, ring, slot, seq = self._pending.popleft()
            frame = ring.read(slot, seq)
            if frame is None:
                self.dropped_frames += 1
                continue
            if frame.speaking and child.speech_cancelled(seq):
                self.cancelled_frames += 1  # barge-in: its speech must not be heard
                continue
            yield frame

    def skip_backlog(self, keep: int = 1) -> None:
        """Drop all but the newest ``keep`` pending frames (a warm spare about to go live)."""
        while len(self._pending) > keep:
            self._pending.popleft()
            self.dropped_frames += 1

    def push_audio(self, pcm16: bytes, sample_rate: int, last_chunk: bool = False) -> bool:
        """Queue speech for the child (mono int16 LE). False if no child can take it now."""
        return self._send(PushAudio(sample_rate, last_chunk, bytes(pcm16)))

    def flush(self) -> bool:
        return self._send(_FlushMsg())

    def interrupt(self) -> bool:
        """Barge-in: the child drops its queued speech; speech frames it rendered before
        that (in the ring, on their way, or pending here) are dropped as they come."""
        child = self._current
        if not self._send(Interrupt()):
            return False
        assert child is not None
        child.interrupts_unacked += 1
        return True

    async def close(self) -> None:
        """Stop the child (ask, dump, kill), the spare and the supervision; bounded time."""
        self._closed = True
        self._frame_event.set()
        await stop_tasks(self._task)
        self._resolve_start(RuntimeFailure(f"renderer {self.name} closed before its first frame"))
        current = self._current
        for child in list(self._children):
            self._retire(child, dump=child is current)
        self._current = self._spare = None
        self._pending.clear()
        while self._helpers.tasks:  # retirements run to their end: they kill what is left
            await asyncio.wait(self._helpers.tasks)
        self._set_state(State.STOPPED, "closed")

    # ------------------------------------------------------------------ internals

    def _set_state(self, new: State, reason: str, *, level: int = logging.INFO) -> None:
        self._state.set(new, reason, level=level)

    def _send(self, msg: Message) -> bool:
        child = self._current
        if child is None or not child.send(msg):
            log.debug("renderer %s: no child to take %s", self.name, type(msg).__name__)
            return False
        return True

    def _on_frame(self, child: ChildProcess, slot: int, seq: int) -> None:
        now = child.last_frame
        if child.frames > 1 and self.last_frame_monotonic is not None:
            self._frame_intervals.append(now - self.last_frame_monotonic)
        self.last_frame_monotonic = now
        self._frame_times.append(now)
        while self._frame_times[0] < now - _FPS_WINDOW_S:
            self._frame_times.popleft()
        if self._first_frame_at is None:
            self._first_frame_at = now
        if child.ring is None:
            return
        # beyond slots - 2 the child is about to overwrite the oldest slots
        while len(self._pending) >= min(self.options.slots - 2, MAX_BACKLOG):
            self._pending.popleft()
            self.dropped_frames += 1
        self._pending.append((child, child.ring, slot, seq))
        self._frame_event.set()

    async def _spawn(self, preload: str = "", nice: int = 0) -> ChildProcess:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)
        shm_name = f"{SHM_PREFIX}{safe_name}-{os.getpid()}-{next(_spawn_ids)}"
        argv = [
            sys.executable, "-P", "-m", "appliance.renderer.child",
            "--fd", str(child_sock.fileno()), "--name", self.name,
            "--parent-pid", str(os.getpid()), "--preload", preload,
        ]  # fmt: skip
        try:
            proc = subprocess.Popen(argv, pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        if nice:
            # a spare importing numpy must not take CPU from the encoder of the live frames
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
        self.spawned += 1
        child = ChildProcess(proc, parent_sock, shm_name)
        self._children.add(child)  # from here on close() will reap it, even if we are cancelled
        await child.connect()
        log.debug("renderer %s: spawned child %d", self.name, child.pid)
        return child

    async def _take_child(self) -> ChildProcess:
        spare, self._spare = self._spare, None
        if spare is not None:
            unfit = self._spare_problem(spare, time.monotonic(), SPARE_ALIVE_S)
            if unfit is None:
                spare.promoted = True
                try:  # back to normal priority now that it renders (needs root or LimitNICE=)
                    os.setpriority(os.PRIO_PROCESS, spare.pid, 0)
                except OSError as exc:
                    log.debug("renderer %s: child %d stays at lower priority: %s", self.name, spare.pid, exc)
                return spare
            log.warning("renderer %s: not promoting spare child %d: %s; starting a fresh child",
                        self.name, spare.pid, unfit)
            self._retire(spare, dump=spare.alive)
        return await self._spawn()

    def _spare_problem(self, spare: ChildProcess, now: float, within_s: float) -> str | None:
        """Why ``spare`` cannot be trusted to take over, or None if it is fit."""
        if not spare.alive or spare.eof:
            return exit_reason(spare.proc.returncode if not spare.alive else None)
        if spare.hello_at is None:  # still importing: as good as a fresh child, and ahead of one
            if now - spare.spawned_at > self._hello_timeout_s:
                return f"no Hello {now - spare.spawned_at:.0f} s after it was started"
            return None
        silent = spare.silent_for(now)
        if silent > within_s:
            return f"it answered no ping for {silent:.1f} s (stopped or hung)"
        return None

    def _check_spare(self, now: float) -> None:
        """Ping the idle spare; replace it once it is dead or silent for SPARE_DEAD_S."""
        spare = self._spare
        if spare is None:
            return
        problem = self._spare_problem(spare, now, SPARE_DEAD_S)
        if problem is not None:
            log.warning("renderer %s: spare child %d is unusable: %s; replacing it",
                        self.name, spare.pid, problem)
            if spare.alive and spare.hello_at is None:  # slow, maybe not hung: do not thrash
                self._hello_timeout_s = min(SPARE_HELLO_MAX_S, 2 * self._hello_timeout_s)
                log.warning("renderer %s: this device starts a renderer child slowly: the next spare "
                            "gets %.0f s for its imports", self.name, self._hello_timeout_s)
            self._retire(spare, dump=spare.alive)
            self._ensure_spare()
        elif spare.hello_at is not None and now - spare.last_ping >= _SPARE_PING_S:
            spare.send(Ping(int(now * 1000)))
            spare.last_ping = now

    def adopt_spare(self, other: Renderer) -> None:
        """Start from ``other``'s idle spare child (interpreter and imports already loaded):
        warming a new model beside a live one then costs no Python start-up CPU."""
        if self._spare is None and other._spare is not None and not self._task:
            self._spare, other._spare = other._spare, None
            other._children.discard(self._spare)
            self._children.add(self._spare)

    def _ensure_spare(self) -> None:
        if self.options.spare and self._spare is None and not self._closed:
            self._helpers.spawn(self._make_spare(), "spare")

    async def _make_spare(self) -> None:
        child = await self._spawn(preload=self.spec.runtime, nice=SPARE_NICE)
        if self._closed or self._spare is not None:
            self._children.discard(child)
            await child.retire(grace_s=self.options.shutdown_grace_s, dump=False)
        else:
            self._spare = child

    def _retire(self, child: ChildProcess, *, dump: bool) -> None:
        self._children.discard(child)
        if child is self._spare:
            self._spare = None
        if child is self._current:
            self._current = None
            self._pending.clear()  # those slots belong to the ring being closed
        self._helpers.spawn(child.retire(grace_s=self.options.shutdown_grace_s, dump=dump),
                            f"retire {child.pid}")

    async def _supervise(self) -> None:
        reason = ""
        try:
            self._set_state(State.STARTING, f"{self.spec.runtime} {self.spec.model}")
            while True:
                child = await self._take_child()
                outcome = await self._serve(child, restarted=bool(reason))
                self._retire(child, dump=outcome.stalled)
                reason = outcome.reason
                if outcome.handshake and child.promoted:  # a dead spare: replace it at once
                    delay = 0.0
                elif outcome.failure is not None:  # not a crash: the operator must act
                    self._backoff.reset()
                    delay = self.options.failed_retry_s
                    line = outcome.failure.operator_line()
                    self.failure = outcome.failure
                    self._set_state(State.FAILED, line, level=logging.ERROR)
                    self._resolve_start(outcome.failure)
                    log.warning("renderer %s: retrying the model in %.0f s", self.name, delay)
                else:
                    if outcome.ran_s >= self.options.healthy_after_s:
                        self._backoff.reset()  # a crash after a healthy run is a first failure
                    delay = self._backoff.next_delay()
                    failures = self._backoff.failures
                    if failures >= self.options.start_attempts and not self._ever_ran:
                        self._resolve_start(RendererCrashed(
                            f"renderer child crashed {failures} times before its first frame: {reason}",
                            setting="[avatar] runtime",
                            fix="see the journal for the child's traceback",
                        ))  # fmt: skip
                    if delay > 0:
                        long = self._backoff.at_cap
                        why = f"{reason}; {failures} failures in a row, next try in {delay:.0f} s"
                        why += " (long backoff: still trying, never giving up)" if long else ""
                        self._set_state(
                            State.BACKOFF, why, level=logging.ERROR if long else logging.WARNING
                        )
                if delay > 0:
                    await asyncio.sleep(delay)
                self.restarts += 1
                self.last_restart_reason = reason
                self._set_state(State.RESTARTING, reason)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not pass silently
            log.exception("renderer %s: supervision failed", self.name)
            self._set_state(State.FAILED, f"supervision failed: {e!r}", level=logging.CRITICAL)
            self._resolve_start(RuntimeFailure(f"renderer supervision failed: {e!r}"))

    def _resolve_start(self, error: BaseException | None) -> None:
        fut = self._started
        if fut is None or fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    async def _serve(self, child: ChildProcess, *, restarted: bool) -> _Outcome:
        """Make ``child`` the current one: handshake, first frame, then watch it until it fails."""
        s = self.spec
        previous_frame = self.last_frame_monotonic
        self._current = child
        child.on_frame = self._on_frame
        child.send(
            Init(s.runtime, s.model, s.width, s.height, child.shm_name, self.options.slots, s.api_secret)
        )
        init_sent_at = time.monotonic()
        deadline = time.monotonic() + self.options.warmup_timeout_s
        warming = False
        while not child.frames:
            if self._closed:
                return _Outcome("closed")
            now = time.monotonic()
            if child.opening_at is not None and not warming:
                warming = True
                self._set_state(State.WARMING, f"child {child.pid} opening {s.model}")
            if child.failure is not None or child.eof:
                return await self._ended(child)
            if child.opening_at is None:
                # a live child answers Init at once (a fresh one once its imports are done)
                since = max(child.hello_at or child.spawned_at, init_sent_at)
                limit = HANDSHAKE_TIMEOUT_S if child.hello_at is not None else self._hello_timeout_s
                if now - since > limit:
                    why = (f"child {child.pid} did not answer Init within {limit:.0f} s"
                           " (stopped or hung); starting a fresh child")
                    self._set_state(State.STALLED, why, level=logging.WARNING)
                    return _Outcome(why, stalled=True, handshake=True)
            if now > deadline:
                why = f"no first frame within {self.options.warmup_timeout_s:.0f} s"
                self._set_state(State.STALLED, f"child {child.pid}: {why}", level=logging.WARNING)
                return _Outcome(why, stalled=True)
            await child.wait(min(deadline - now, 0.25))
        child.running_since = time.monotonic()
        if child.ready is not None:
            self.video = VideoSpec(child.ready.width, child.ready.height, child.ready.fps)
        gap = ""
        if restarted and previous_frame is not None and child.first_frame_at is not None:
            self.last_restart_gap_s = child.first_frame_at - previous_frame
            gap = f", {self.last_restart_gap_s:.2f} s without frames"
        self.failure = None
        self._set_state(State.RUNNING, f"child {child.pid} rendering{gap}")
        self._ever_ran = True
        self._resolve_start(None)
        self._ensure_spare()
        return await self._watch(child)

    async def _watch(self, child: ChildProcess) -> _Outcome:
        tick = max(0.05, min(0.25, self.options.stall_timeout_s / 4))
        last_ping = 0.0
        frame_seen, wait_at_frame = child.last_frame, cpu_wait_s()
        while True:
            await child.wait(tick)
            if self._closed:
                return _Outcome("closed")
            now = time.monotonic()
            if child.failure is not None or child.eof:
                return await self._ended(child)
            if child.last_frame != frame_seen:  # within a tick of the frame: close enough
                frame_seen, wait_at_frame = child.last_frame, cpu_wait_s()
            silent = now - child.last_frame
            limit = self.stall_limit_s()
            if silent > limit and self._starved(child, silent, limit, wait_at_frame):
                continue
            if self._frame_intervals and limit > self.options.stall_timeout_s and not self._slow_said:
                self._slow_said = True
                log.warning("renderer %s: frames come %.1f s apart on this device: a stall is %.1f s "
                            "without a frame here, not [avatar] stall_timeout_s = %.1f (the device is "
                            "too slow or overloaded for a smooth avatar)", self.name,
                            self.usual_frame_interval_s(), limit, self.options.stall_timeout_s)
            if silent > limit:
                pong = now - child.last_pong if child.last_pong else silent
                loop = (
                    "its event loop answers pings"
                    if pong < 2 * _PING_EVERY_S
                    else f"no pong for {pong:.1f} s"
                )
                why = f"no frames for {silent:.1f} s ({loop})"
                self._set_state(State.STALLED, f"child {child.pid}: {why}", level=logging.WARNING)
                assert child.running_since is not None
                return _Outcome(
                    f"stalled: {why}", stalled=True, ran_s=child.last_frame - child.running_since
                )
            if now - last_ping >= _PING_EVERY_S:
                child.send(Ping(int(now * 1000)))
                last_ping = now
            self._check_spare(now)

    def _starved(self, child: ChildProcess, silent: float, limit: float,
                 wait_at_frame: float | None) -> bool:
        """Was the silence the CPUs being busy rather than the child? Then it is no stall yet."""
        wait_now = cpu_wait_s()
        if wait_at_frame is None or wait_now is None or silent > SLOW_STALL_MAX_S:
            return False
        waited = min(silent, wait_now - wait_at_frame)
        if silent - waited > limit:
            return False
        if not self._starved_said:
            self._starved_said = True
            log.warning("renderer %s: child %d has had no frame for %.1f s, but for %.1f s of it "
                        "tasks were waiting for a CPU (the device is overloaded): not a stall "
                        "until %.1f s of silence with a CPU free, or %.0f s in all", self.name,
                        child.pid, silent, waited, limit, SLOW_STALL_MAX_S)
        return True

    async def _ended(self, child: ChildProcess) -> _Outcome:
        ran = child.last_frame - child.running_since if child.running_since is not None else 0.0
        f = child.failure
        if f is not None and f.kind != "crash":
            return _Outcome(_failure_exception(f).operator_line(), failure=_failure_exception(f))
        await child.wait_exit(1.0)
        reason = exit_reason(child.proc.returncode if not child.alive else None)
        if f is not None:
            reason = f"runtime crashed: {f.message} ({reason})"
        log.warning("renderer %s: child %d ended: %s", self.name, child.pid, reason)
        return _Outcome(reason, ran_s=max(ran, 0.0))
