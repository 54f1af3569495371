"""The avatar runtime in a supervised child process.

    renderer.py  the parent side: one child and its spare, supervision, frames out
    child.py     the child process, its wire protocol and the shared-memory ring
"""

from appliance.renderer.renderer import (
    MAX_BACKLOG,
    SHM_PREFIX,
    Renderer,
    RendererCrashed,
    RendererOptions,
    RendererSpec,
    State,
    sweep_stale_segments,
)

__all__ = ["MAX_BACKLOG", "SHM_PREFIX", "Renderer", "RendererOptions", "RendererCrashed", "RendererSpec", "State",
           "sweep_stale_segments"]
