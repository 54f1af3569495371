"""The avatar rendered on this device: a supervised renderer child, and model swaps.

The current :class:`Renderer` is the fan-out's frame source. A new model warms
up in a second renderer (started from the current one's idle spare, so no
Python start-up competes with the live encoder) while the current one keeps
publishing; once it renders at a healthy rate the fan-out switches on a frame
boundary and the old renderer is closed. The renderer's own problems (a model
that cannot open, a refused credential) are this backend's to report and to
dismiss.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from appliance import __version__
from appliance.media import FrameFanout
from appliance.renderer import Renderer, RendererOptions, RendererSpec, State
from appliance.runtimes import RuntimeFailure, VideoSpec
from appliance.status.problems import ProblemOwner

__all__ = ["LocalBackend", "hold_key"]

log = logging.getLogger("appliance.backends")


def hold_key(spec: RendererSpec) -> str:
    """Names what a hold loop shows: the runtime, the model file as it is now, the size."""
    try:
        stat = os.stat(spec.model) if spec.model else None
    except OSError:
        stat = None
    version = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else __version__
    return f"{spec.runtime}|{spec.model}|{version}|{spec.width}x{spec.height}"


class LocalBackend:
    name = "local"

    def __init__(self, fanout: FrameFanout, problems: ProblemOwner, *, stall_timeout_s: float,
                 on_state: Callable[[], None] | None = None) -> None:
        self._fanout = fanout
        self._problems = problems
        self._on_state = on_state
        self._options = RendererOptions(stall_timeout_s=stall_timeout_s)
        self.renderer: Renderer | None = None
        self.spec: RendererSpec | None = None  # what self.renderer renders
        self._generation = 0  # renderers are named #1, #2... as models are swapped in

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, spec: RendererSpec) -> None:
        """Render ``spec``; returns once it renders, or once it is known not to (the
        renderer retries by itself; the problem says why)."""
        renderer = self._new_renderer(spec)
        self.renderer, self.spec = renderer, spec
        self._fanout.hold.use_model(hold_key(spec))
        self._fanout.switch_to(renderer)
        try:
            await renderer.start()
        except RuntimeFailure as exc:
            # a bad model or credential: keep serving what can be served, say why, let it retry
            self._problems.report_error(exc, subject=spec.model)

    async def switch_to(self, spec: RendererSpec, deadline_s: float) -> str | None:
        """Warm ``spec`` beside the current renderer; switch on a frame boundary once it
        renders healthily. Returns why it failed (the current one keeps serving), or None."""
        log.info("warming %s model %s beside the current one", spec.runtime, spec.model,
                 extra={"model": spec.model, "backend": spec.runtime})
        fresh = self._new_renderer(spec)
        if self.renderer is not None:
            fresh.adopt_spare(self.renderer)
        reason = await self._warm(fresh, deadline_s)
        if reason is not None:
            await fresh.close()
            return reason
        fresh.skip_backlog(keep=2)  # two frames absorb the phase offset between the two clocks
        old, self.renderer, self.spec = self.renderer, fresh, spec
        if old is None or self._fanout.source is old:  # not while a remote backend serves
            self._fanout.hold.use_model(hold_key(spec))
            self._fanout.switch_to(fresh)  # from its next frame on
        self._problems.clear()  # the new model renders: the old one's problems are gone
        log.info("now rendering %s", spec.model, extra={"model": spec.model, "backend": spec.runtime})
        if old is not None:
            old.interrupt()
            await old.close()
        return None

    async def _warm(self, fresh: Renderer, deadline_s: float) -> str | None:
        deadline = time.monotonic() + deadline_s
        try:
            await asyncio.wait_for(fresh.start(), timeout=deadline_s)
            # healthy = frames at (nearly) the full rate for a second, not just one frame
            while fresh.fps < 0.8 * (fresh.video.fps if fresh.video else 25.0) or fresh.state is not State.RUNNING:
                if time.monotonic() > deadline:
                    return f"rendered {fresh.fps:.1f} fps, not a healthy rate, within {deadline_s:.0f} s"
                await asyncio.sleep(0.2)
        except RuntimeFailure as exc:
            return exc.operator_line()
        except TimeoutError:
            return f"no frame within {deadline_s:.0f} s"
        return None

    def _new_renderer(self, spec: RendererSpec) -> Renderer:
        self._generation += 1
        renderer: Renderer

        def on_state(old: State, new: State, reason: str) -> None:
            if renderer is self.renderer:  # a renderer being warmed or retired is not the kiosk's
                if new is State.RUNNING:
                    self._problems.clear()
                elif new is State.FAILED and renderer.failure is not None:
                    self._problems.report_error(renderer.failure, subject=renderer.spec.model)
            if self._on_state is not None:
                self._on_state()

        renderer = Renderer(spec, self._options, name=f"#{self._generation}", on_state=on_state)
        return renderer

    def set_stall_timeout(self, seconds: float) -> None:
        self._options = dataclasses.replace(self._options, stall_timeout_s=seconds)
        if self.renderer is not None:
            self.renderer.options = dataclasses.replace(self.renderer.options, stall_timeout_s=seconds)

    async def close(self) -> None:
        if self.renderer is not None:
            await self.renderer.close()

    # -- health and status ---------------------------------------------------------

    @property
    def video(self) -> VideoSpec | None:
        return self.renderer.video if self.renderer else None

    def running(self) -> bool:
        return self.renderer is not None and self.renderer.state is State.RUNNING

    def failed(self) -> bool:
        return self.renderer is not None and self.renderer.state is State.FAILED

    def healthy(self) -> bool:
        return self.running() and self._fanout.flowing(1.0)

    def status(self) -> dict[str, Any]:
        renderer = self.renderer
        return {
            "state": renderer.state.value if renderer else None,
            "pid": renderer.pid if renderer else None,
            "restarts": renderer.restarts if renderer else 0,
            "last_restart_reason": renderer.last_restart_reason if renderer else None,
        }

    # -- speech (the room's SpeechSink): always the current renderer ------------------

    def push_audio(self, pcm16: bytes, sample_rate: int, last_chunk: bool = False) -> object:
        return self.renderer.push_audio(pcm16, sample_rate, last_chunk) if self.renderer else False

    def flush(self) -> object:
        return self.renderer.flush() if self.renderer else False

    def interrupt(self) -> object:
        self._fanout.drop_queued_audio()  # barge-in: the local speaker stops too
        return self.renderer.interrupt() if self.renderer else False
