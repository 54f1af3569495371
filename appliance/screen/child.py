"""The screen child: shows the newest shared frame full-screen with SDL2 (run by ``screen.py``).

    python -m appliance.screen.child --fd N [--rotate 0|90|180|270]

On a kiosk ``SDL_VIDEODRIVER=kmsdrm`` and ``SDL_RENDER_DRIVER=opengles2``: no
compositor, no X; tests use ``x11`` (Xvfb) and ``offscreen``. The frame is
uploaded into a streaming RGB24 texture and the GPU scales, letterboxes and
rotates it (``SDL_RenderCopyEx`` into a centred rectangle). When frames stop
the last one stays on the glass (it is presented again twice a second).

It says what happens as JSON lines on stdout, which the supervisor reads::

    {"event": "ready", "driver": "KMSDRM", "renderer": "opengles2", "mode": "1280x720@75", ...}
    {"event": "stats", "fps": 25.0, "frames": 1234, "latency_ms": {...}}   every second
    {"event": "error", "stage": "video", "error": "No currently active connector found."}

and exits 2 after an error. It stops on SIGTERM, or when its parent is gone.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from appliance.screen.buffer import FrameBuffer

__all__ = ["letterbox", "Window", "main"]

ROTATIONS = (0, 90, 180, 270)
REPRESENT_S = 0.5  # show the last frame again this often while no new one comes
# Below the renderer: without a GPU (llvmpipe) drawing competes with rendering, and the
# renderer feeds the room and the screen alike
NICE = 5
STATS_S = 1.0


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int


def letterbox(frame_w: int, frame_h: int, out_w: int, out_h: int, rotate: int) -> Rect:
    """Where the (unrotated) frame goes so that, rotated ``rotate``° clockwise about its
    centre, it is as large as fits and centred: black bars on the other two sides."""
    turned = rotate in (90, 270)
    shown_w, shown_h = (frame_h, frame_w) if turned else (frame_w, frame_h)
    scale = min(out_w / shown_w, out_h / shown_h)
    w, h = round(frame_w * scale), round(frame_h * scale)
    return Rect((out_w - w) // 2, (out_h - h) // 2, w, h)


class SdlError(Exception):
    def __init__(self, stage: str, error: str) -> None:
        super().__init__(f"{stage}: {error}")
        self.stage, self.error = stage, error


class Window:
    """One full-screen SDL window and renderer; ``show`` draws a frame and presents it."""

    def __init__(self, rotate: int = 0) -> None:
        import sdl2  # here, not at import: the layout maths above needs no SDL

        self.sdl, self.rotate = sdl2, rotate
        sdl2.SDL_SetHint(sdl2.SDL_HINT_RENDER_SCALE_QUALITY, b"1")  # linear: a face, not pixel art
        if sdl2.SDL_Init(sdl2.SDL_INIT_VIDEO) != 0:
            raise SdlError("video", self._error())
        mode = sdl2.SDL_DisplayMode()
        if sdl2.SDL_GetDesktopDisplayMode(0, ctypes.byref(mode)) != 0:
            raise SdlError("display", self._error())
        self.mode = f"{mode.w}x{mode.h}@{mode.refresh_rate}"
        self.driver = (sdl2.SDL_GetCurrentVideoDriver() or b"").decode()
        self.display = (sdl2.SDL_GetDisplayName(0) or b"").decode(errors="replace")
        flags = sdl2.SDL_WINDOW_FULLSCREEN_DESKTOP | sdl2.SDL_WINDOW_BORDERLESS
        self.window = sdl2.SDL_CreateWindow(b"appliance", sdl2.SDL_WINDOWPOS_UNDEFINED,
                                            sdl2.SDL_WINDOWPOS_UNDEFINED, mode.w, mode.h, flags)
        if not self.window:
            raise SdlError("window", self._error())
        sdl2.SDL_ShowCursor(sdl2.SDL_DISABLE)
        self.renderer = sdl2.SDL_CreateRenderer(
            self.window, -1, sdl2.SDL_RENDERER_ACCELERATED | sdl2.SDL_RENDERER_PRESENTVSYNC)
        if not self.renderer:  # e.g. no GL at all: SDL's software renderer still letterboxes
            self.renderer = sdl2.SDL_CreateRenderer(self.window, -1, 0)
        if not self.renderer:
            raise SdlError("renderer", self._error())
        info = sdl2.SDL_RendererInfo()
        sdl2.SDL_GetRendererInfo(self.renderer, ctypes.byref(info))
        self.renderer_name = info.name.decode()
        w, h = ctypes.c_int(), ctypes.c_int()
        sdl2.SDL_GetRendererOutputSize(self.renderer, ctypes.byref(w), ctypes.byref(h))
        self.out_w, self.out_h = w.value, h.value
        self.texture = None
        self.tex_size = (0, 0)
        self.cursor_shown = sdl2.SDL_ShowCursor(sdl2.SDL_QUERY) == sdl2.SDL_ENABLE

    def _error(self) -> str:
        return (self.sdl.SDL_GetError() or b"").decode(errors="replace") or "unknown SDL error"

    def upload(self, image: np.ndarray) -> None:
        """Copy an RGB (h, w, 3) frame into the texture (its size may change)."""
        sdl2 = self.sdl
        h, w = image.shape[:2]
        if (w, h) != self.tex_size:
            if self.texture:
                sdl2.SDL_DestroyTexture(self.texture)
            self.texture = sdl2.SDL_CreateTexture(self.renderer, sdl2.SDL_PIXELFORMAT_RGB24,
                                                  sdl2.SDL_TEXTUREACCESS_STREAMING, w, h)
            if not self.texture:
                raise SdlError("texture", self._error())
            self.tex_size = (w, h)
        image = np.ascontiguousarray(image)
        # pitch is the frame's own row length: a wrong pitch is the classic striped picture
        if sdl2.SDL_UpdateTexture(self.texture, None, ctypes.c_void_p(image.ctypes.data), w * 3) != 0:
            raise SdlError("upload", self._error())

    def present(self) -> None:
        """Draw and flip."""
        self.draw()
        self.sdl.SDL_RenderPresent(self.renderer)

    def draw(self) -> None:
        """Clear to black, draw the texture letterboxed and rotated (not yet on the glass)."""
        sdl2 = self.sdl
        sdl2.SDL_SetRenderDrawColor(self.renderer, 0, 0, 0, 255)
        sdl2.SDL_RenderClear(self.renderer)
        if self.texture:
            r = letterbox(*self.tex_size, self.out_w, self.out_h, self.rotate)
            dst = sdl2.SDL_Rect(r.x, r.y, r.w, r.h)
            sdl2.SDL_RenderCopyEx(self.renderer, self.texture, None, ctypes.byref(dst),
                                  float(self.rotate), None, sdl2.SDL_FLIP_NONE)

    def read_pixels(self) -> np.ndarray:
        """What ``draw`` drew, RGB (out_h, out_w, 3): for tests."""
        sdl2 = self.sdl
        out = np.zeros((self.out_h, self.out_w, 3), np.uint8)
        if sdl2.SDL_RenderReadPixels(self.renderer, None, sdl2.SDL_PIXELFORMAT_RGB24,
                                     ctypes.c_void_p(out.ctypes.data), self.out_w * 3) != 0:
            raise SdlError("read", self._error())
        return out

    def pump(self) -> bool:
        """Handle window events; False when asked to quit."""
        event = self.sdl.SDL_Event()
        while self.sdl.SDL_PollEvent(ctypes.byref(event)):
            if event.type == self.sdl.SDL_QUIT:
                return False
        return True

    def close(self) -> None:
        sdl2 = self.sdl
        if self.texture:
            sdl2.SDL_DestroyTexture(self.texture)
        sdl2.SDL_DestroyRenderer(self.renderer)
        sdl2.SDL_DestroyWindow(self.window)
        sdl2.SDL_Quit()


def _emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class _Stats:
    """Presented frames per second and frame-to-screen latency over the last report period."""

    def __init__(self) -> None:
        self.frames = 0
        self.since = time.monotonic()
        self.period_frames = 0
        self.latencies: list[float] = []

    def presented(self, latency_s: float) -> None:
        self.frames += 1
        self.period_frames += 1
        self.latencies.append(latency_s)

    def report(self, now: float) -> None:
        fps = self.period_frames / max(now - self.since, 1e-6)
        lat = sorted(self.latencies)
        latency = ({"p50": round(1000 * lat[len(lat) // 2], 2), "max": round(1000 * lat[-1], 2)}
                   if lat else None)
        _emit(event="stats", fps=round(fps, 2), frames=self.frames, latency_ms=latency)
        self.since, self.period_frames, self.latencies = now, 0, []


def run(buffer: FrameBuffer, rotate: int) -> int:
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    parent = os.getppid()
    os.nice(NICE)
    try:
        window = Window(rotate)
    except SdlError as exc:
        _emit(event="error", stage=exc.stage, error=exc.error)
        return 2
    _emit(event="ready", driver=window.driver, renderer=window.renderer_name, mode=window.mode,
          output=[window.out_w, window.out_h], display=window.display, rotate=rotate,
          cursor=window.cursor_shown)
    stats, shown, last_present = _Stats(), 0, 0.0
    next_report = time.monotonic() + STATS_S
    try:
        while not stopping and os.getppid() == parent and window.pump():
            seq, now = buffer.seq, time.monotonic()
            if seq != shown and seq > 0:
                image, handed_at = buffer.slot(seq)
                window.upload(image)
                if buffer.still_valid(seq):  # else torn: the next frame is already there
                    window.present()
                    last_present = time.monotonic()
                    stats.presented(last_present - handed_at)
                shown = seq
            elif now - last_present > REPRESENT_S:
                window.present()  # the last good frame stays (never black when frames stop)
                last_present = time.monotonic()
            else:
                time.sleep(0.003)  # a new frame is shown within ~3 ms of arriving
            if now >= next_report:
                stats.report(now)
                next_report = now + STATS_S
    except SdlError as exc:
        _emit(event="error", stage=exc.stage, error=exc.error)
        return 2
    finally:
        window.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="show shared frames full-screen (SDL2)")
    parser.add_argument("--fd", type=int, required=True, help="the frame buffer's memfd")
    parser.add_argument("--rotate", type=int, default=0, choices=ROTATIONS)
    args = parser.parse_args(argv)
    buffer = FrameBuffer(args.fd)
    try:
        return run(buffer, args.rotate)
    finally:
        buffer.close()


if __name__ == "__main__":
    sys.exit(main())
