"""Drawing the reference avatar: layout, the face's layers, and the mouth box.

Pure numpy: a model (``reference.ReferenceModel``) and a frame size give a
``Layout`` in pixels; the still parts (background, body, head) are painted
once into layers with soft coverage masks; ``ReferenceRuntime`` composes them
per frame and draws what moves (eyes, lids, mouth) itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from appliance.runtimes.reference import ReferenceModel

@dataclass(frozen=True)
class Layout:
    """Pixel geometry of a model at one frame size."""

    s: float  # unit length: min(width, height)
    cx: float
    cy: float  # head centre
    head_a: float
    head_b: float
    eye_dx: float
    eye_y: float
    eye_a: float
    eye_b: float
    mouth_y: float
    mouth_a: float
    lip: float
    sway_px: float


def layout(model: ReferenceModel, width: int, height: int) -> Layout:
    g = model.geometry
    s = float(min(width, height))
    return Layout(
        s=s,
        cx=width / 2.0,
        cy=height * g["head_y"],
        head_a=g["head_width"] * s / 2,
        head_b=g["head_height"] * s / 2,
        eye_dx=g["eye_spacing"] * s / 2,
        eye_y=g["eye_y"] * s,
        eye_a=g["eye_size"] * s / 2,
        eye_b=g["eye_size"] * s * 0.3,
        mouth_y=g["mouth_y"] * s,
        mouth_a=g["mouth_width"] * s / 2,
        lip=g["lip_thickness"] * s,
        sway_px=g["sway"] * s / 128.0,
    )


def max_open(lay: Layout) -> float:
    return lay.mouth_a * 0.45  # scale of the inner mouth's half-height at full openness


# Head motion bounds in units of Layout.sway_px (see ReferenceRuntime._render).
SWAY_X = 3.0
SWAY_UP, SWAY_DOWN = 1.0, 2.5


def mouth_box(model: ReferenceModel, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixels that contain the mouth opening at every openness and head offset.

    The box stays inside the face (the lips' outer corners may stick out), so
    :func:`mouth_open_fraction` of an idle frame is ~0 and of a speaking one is large.
    """
    lay = layout(model, width, height)
    mo, sw = max_open(lay), lay.sway_px
    mx = lay.mouth_a + SWAY_X * sw + 1
    up = 0.79 * mo + SWAY_UP * sw + 1.5
    down = 1.32 * mo + SWAY_DOWN * sw + 1.8
    y = lay.cy + lay.mouth_y
    x0, x1 = int(max(0, math.floor(lay.cx - mx))), int(min(width, math.ceil(lay.cx + mx)))
    y0, y1 = int(max(0, math.floor(y - up))), int(min(height, math.ceil(y + down)))
    return x0, y0, x1, y1





def mouth_open_fraction(
    image: np.ndarray, box: tuple[int, int, int, int], threshold: float = 50.0
) -> float:
    """Fraction of dark (open-mouth) pixels in ``box`` of an RGB image: ~0 closed, larger open.

    Robust to video compression, so end-to-end tests can use it on frames received
    over the network.
    """
    x0, y0, x1, y1 = box
    roi = image[y0:y1, x0:x1].astype(np.float32)
    luma = roi[..., 0] * 0.299 + roi[..., 1] * 0.587 + roi[..., 2] * 0.114
    return float((luma < threshold).mean()) if luma.size else 0.0


# ----------------------------------------------------------------------------- drawing


def cov_ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float
) -> np.ndarray:
    """Anti-aliased coverage (0..1) of an axis-aligned ellipse on grids x, y."""
    a, b = max(a, 0.5), max(b, 0.5)
    u, v = (x - cx) / a, (y - cy) / b
    r = np.sqrt(u * u + v * v)
    grad = np.sqrt((u / a) ** 2 + (v / b) ** 2)  # |grad r| * r: turns (1 - r) into pixels
    dist = (1.0 - r) * r / np.maximum(grad, 1e-6)
    return np.clip(dist + 0.5, 0.0, 1.0)


class Layer:
    """A pre-multiplied RGBA sprite placed at (x, y) in the frame."""

    def __init__(self, x: int, y: int, w: int, h: int) -> None:
        self.x, self.y = x, y
        self.rgb = np.zeros((h, w, 3), np.float32)  # pre-multiplied
        self.alpha = np.zeros((h, w, 1), np.float32)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.gx, self.gy = xx + x + 0.5, yy + y + 0.5  # pixel centres, frame coordinates

    def paint(self, cov: np.ndarray, color: tuple[int, int, int], opacity: float = 1.0) -> None:
        c = (cov * opacity)[..., None].astype(np.float32)
        self.rgb *= 1.0 - c
        self.rgb += c * np.asarray(color, np.float32)
        self.alpha *= 1.0 - c
        self.alpha += c

    def freeze(self) -> None:
        self.inv_alpha = (1.0 - self.alpha).astype(np.float32)
        del self.gx, self.gy


def blit(frame: np.ndarray, layer: Layer, dx: int, dy: int) -> None:
    h, w = layer.alpha.shape[:2]
    x0, y0 = layer.x + dx, layer.y + dy
    fx0, fy0 = max(x0, 0), max(y0, 0)
    fx1, fy1 = min(x0 + w, frame.shape[1]), min(y0 + h, frame.shape[0])
    if fx1 <= fx0 or fy1 <= fy0:
        return
    sx, sy = fx0 - x0, fy0 - y0
    sl = (slice(sy, sy + fy1 - fy0), slice(sx, sx + fx1 - fx0))
    dst = frame[fy0:fy1, fx0:fx1]
    out = dst * layer.inv_alpha[sl]
    out += layer.rgb[sl]
    np.copyto(dst, out, casting="unsafe")


def clip_box(
    x0: float, y0: float, x1: float, y1: float, w: int, h: int
) -> tuple[int, int, int, int]:
    return (
        max(0, int(math.floor(x0))),
        max(0, int(math.floor(y0))),
        min(w, int(math.ceil(x1))),
        min(h, int(math.ceil(y1))),
    )


def background(model: ReferenceModel, w: int, h: int) -> np.ndarray:
    top = np.asarray(model.colors["background_top"], np.float32)
    bottom = np.asarray(model.colors["background_bottom"], np.float32)
    t = (np.arange(h, dtype=np.float32) + 0.5) / h
    bg = top[None, None, :] * (1 - t)[:, None, None] + bottom[None, None, :] * t[:, None, None]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.sqrt(((xx - w / 2) / (w * 0.75)) ** 2 + ((yy - h * 0.42) / (h * 0.75)) ** 2)
    bg = bg * np.clip(1.15 - 0.45 * r, 0.55, 1.1)[..., None]
    return np.clip(bg, 0, 255).astype(np.uint8)


def body(model: ReferenceModel, lay: Layout, w: int, h: int) -> Layer:
    c, s = model.colors, lay.s
    top = lay.cy + lay.head_b * 0.55
    x0, y0, x1, y1 = clip_box(lay.cx - 0.5 * s, top, lay.cx + 0.5 * s, h + 4, w, h + 4)
    L = Layer(x0, y0, x1 - x0, y1 - y0)
    neck_a = lay.head_a * 0.36
    neck = np.clip(neck_a - np.abs(L.gx - lay.cx) + 0.5, 0, 1) * (
        L.gy < lay.cy + lay.head_b + 0.12 * s
    )
    L.paint(neck, c["skin_shadow"])
    shoulders_y = lay.cy + lay.head_b + 0.2 * s
    L.paint(
        cov_ellipse(L.gx, L.gy, lay.cx, shoulders_y + 0.16 * s, 0.46 * s, 0.25 * s), c["shirt"]
    )
    collar = np.clip(
        neck_a * 1.1 - np.abs(L.gx - lay.cx) - (L.gy - (shoulders_y - 0.08 * s)) * 0.9 + 0.5, 0, 1
    )
    collar *= L.gy > shoulders_y - 0.1 * s
    L.paint(collar, c["skin_shadow"])
    L.freeze()
    return L


def head(model: ReferenceModel, lay: Layout, w: int, h: int) -> Layer:
    c, g, s = model.colors, model.geometry, lay.s
    style = g["hair_style"]
    a, b, cx, cy = lay.head_a, lay.head_b, lay.cx, lay.cy
    down = b * (1.55 if style == "long" else 1.04)
    up = b * (1.42 if style == "bun" else 1.12)
    side = a * (1.35 if style == "long" else 1.22)
    x0, y0, x1, y1 = clip_box(cx - side, cy - up, cx + side, cy + down, w, h)
    L = Layer(x0, y0, x1 - x0, y1 - y0)
    X, Y = L.gx, L.gy
    if style == "long":  # hair behind the head, falling to the shoulders
        back = cov_ellipse(X, Y, cx, cy + 0.02 * s, a * 1.22, b * 1.1)
        back = np.maximum(
            back,
            np.clip(a * 1.2 - np.abs(X - cx) + 0.5, 0, 1)
            * (Y > cy)
            * np.clip(cy + b * 1.5 - Y, 0, 1),
        )
        behind_neck = np.clip(a * 0.36 - 3 * lay.sway_px - np.abs(X - cx) + 0.5, 0, 1) * (
            Y > cy + b * 0.5
        )  # the neck is in front
        L.paint(back * (1 - behind_neck), c["hair"])
    for side_sign in (-1, 1):  # ears
        L.paint(
            cov_ellipse(
                X, Y, cx + side_sign * a * 0.97, cy + lay.eye_y + 0.02 * s, a * 0.14, b * 0.15
            ),
            c["skin_shadow"],
        )
    # face: an egg, narrower towards the chin
    yn = (Y - cy) / b
    a_y = a * (1.0 - 0.22 * np.clip(yn, 0, 1) ** 2)
    r = np.sqrt(((X - cx) / a_y) ** 2 + yn**2)
    face = np.clip((1.0 - r) * min(a, b) + 0.5, 0, 1)
    L.paint(face, c["skin"])
    # soft shading at the jaw and the cheeks
    L.paint(face * np.clip((r - 0.8) * 3.0, 0, 1) * 0.35, c["skin_shadow"])
    for side_sign in (-1, 1):
        L.paint(
            cov_ellipse(
                X, Y, cx + side_sign * lay.eye_dx * 1.15, cy + lay.mouth_y * 0.55, a * 0.2, b * 0.1
            )
            * 0.28,
            c["cheeks"],
        )
    if style != "none":
        cap = cov_ellipse(X, Y, cx, cy - 0.012 * s, a * 1.07, b * 1.04)
        hairline = cy - b * 0.42 + b * 0.32 * ((X - cx) / a) ** 2
        if style == "long":  # side parting
            hairline = hairline + b * 0.08 * np.tanh((X - cx - a * 0.25) / (0.05 * s))
        cap *= np.clip(hairline - Y + 0.5, 0, 1)
        L.paint(cap, c["hair"])
        if style == "bun":
            L.paint(cov_ellipse(X, Y, cx, cy - b * 1.15, a * 0.38, b * 0.26), c["hair"])
    # eyes: white, iris, pupil, highlight, upper lash line
    for side_sign in (-1, 1):
        ex, ey = cx + side_sign * lay.eye_dx, cy + lay.eye_y
        white = cov_ellipse(X, Y, ex, ey, lay.eye_a, lay.eye_b)
        L.paint(white, (250, 250, 248))
        L.paint(cov_ellipse(X, Y, ex, ey, lay.eye_b * 1.05, lay.eye_b * 1.05) * white, c["eyes"])
        L.paint(
            cov_ellipse(X, Y, ex, ey, lay.eye_b * 0.48, lay.eye_b * 0.48) * white, (15, 12, 12)
        )
        L.paint(
            cov_ellipse(
                X, Y, ex + lay.eye_b * 0.35, ey - lay.eye_b * 0.35, lay.eye_b * 0.2, lay.eye_b * 0.2
            )
            * white,
            (255, 255, 255),
        )
        rim = cov_ellipse(X, Y, ex, ey, lay.eye_a + 0.006 * s, lay.eye_b + 0.006 * s) - white
        L.paint(np.clip(rim, 0, 1) * (Y < ey), c["brows"])
        # brows: a flat ellipse, tilted
        by = cy + g["brow_y"] * s + side_sign * g["brow_tilt"] * (X - ex) * 0.5
        brow = 1 - np.sqrt(((X - ex) / (lay.eye_a * 1.25)) ** 2 + ((Y - by) / (0.011 * s)) ** 2)
        L.paint(np.clip(brow * 0.011 * s + 0.5, 0, 1), c["brows"])
    # nose: tip shading and nostrils
    ny = cy + g["nose_y"] * s
    L.paint(cov_ellipse(X, Y, cx, ny, 0.03 * s, 0.02 * s) * 0.45, c["skin_shadow"])
    bridge = (
        np.clip(0.006 * s - np.abs(X - cx - 0.012 * s) + 0.5, 0, 1)
        * (Y > cy + lay.eye_y + 0.02 * s)
        * (Y < ny)
    )
    L.paint(bridge * 0.35, c["skin_shadow"])
    for side_sign in (-1, 1):
        L.paint(
            cov_ellipse(X, Y, cx + side_sign * 0.013 * s, ny + 0.008 * s, 0.006 * s, 0.004 * s)
            * 0.7,
            c["brows"],
        )
    L.freeze()
    return L
