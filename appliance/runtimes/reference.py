"""The ``reference`` runtime: our own procedural avatar, drawn with numpy.

No licence and no network: it is the embedded default, the demo, and what the
test-suite renders with.  It is a real runtime all the same: frames come at
the configured rate and size, the mouth follows the audio (openness from the
RMS energy of each frame's audio slice, wide vs round from its spectral
centroid), and while idle the face blinks and sways so the room never shows a
frozen picture.

Its "model" is a small JSON file of colours and geometry::

    {"format": "appliance-reference-avatar", "version": 1, "name": "Ada", "seed": 7,
     "colors": {"skin": "#e8b896", ...}, "geometry": {"head_width": 0.42, ...}}

Every key of ``colors`` and ``geometry`` is optional (defaults: ``DEFAULT_COLORS``
and ``DEFAULT_GEOMETRY``); unknown keys are refused so a typo is never silent.

Speed: the static layers (background, body, head with hair, eyes, brows, nose)
are rendered once in :meth:`ReferenceRuntime.open`; a frame composites two
pre-multiplied sprites at small integer offsets and redraws only the eyelid and
mouth regions, all vectorised (a few ms per 512×512 frame).  Everything that
moves is a function of the frame index, the seed and the audio, so two runs with
the same input render the same frames.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from appliance.runtimes import (
    AUDIO_SAMPLE_RATE,
    Frame,
    ModelInvalid,
    ModelMissing,
    Runtime,
    VideoSpec,
)
from appliance.runtimes.reference_draw import (
    SWAY_DOWN,
    SWAY_UP,
    background,
    blit,
    body,
    cov_ellipse,
    head,
    layout,
    max_open,
    mouth_box,
    mouth_open_fraction,
)

__all__ = [
    "ReferenceRuntime",
    "ReferenceModel",
    "StreamResampler",
    "DEFAULT_COLORS",
    "DEFAULT_GEOMETRY",
    "MODEL_FORMAT",
    "bundled_model_path",
    "load_model",
    "mouth_box",
    "mouth_box_for",
    "mouth_open_fraction",
    "resample_linear",
]

MODEL_FORMAT = "appliance-reference-avatar"
MODEL_VERSION = 1
SETTING = "[avatar] model"

DEFAULT_COLORS: dict[str, str] = {
    "background_top": "#2c3e57",
    "background_bottom": "#101826",
    "skin": "#e8b896",
    "skin_shadow": "#c98f6e",
    "hair": "#3b2416",
    "eyes": "#4a6b3a",
    "brows": "#2e1c10",
    "lips": "#b8575a",
    "mouth": "#2a0b0e",
    "teeth": "#f4f1ea",
    "tongue": "#a8404a",
    "shirt": "#3f7fb5",
    "cheeks": "#e58f8a",
}

# Lengths are fractions of min(width, height); positions relative to the head centre.
DEFAULT_GEOMETRY: dict[str, Any] = {
    "head_width": 0.40,
    "head_height": 0.52,
    "head_y": 0.44,  # head centre, fraction of the frame height from the top
    "eye_spacing": 0.165,
    "eye_size": 0.07,
    "eye_y": -0.02,
    "brow_y": -0.075,
    "brow_tilt": 0.1,
    "nose_y": 0.06,
    "mouth_y": 0.145,
    "mouth_width": 0.13,
    "lip_thickness": 0.014,
    "hair_style": "short",
    "sway": 1.0,
}
HAIR_STYLES = ("short", "long", "bun", "none")
MAX_CATCH_UP_S = 0.25  # see ReferenceRuntime.frames
_GEOMETRY_RANGES: dict[str, tuple[float, float]] = {
    "head_width": (0.2, 0.6),
    "head_height": (0.25, 0.7),
    "head_y": (0.3, 0.6),
    "eye_spacing": (0.08, 0.25),
    "eye_size": (0.03, 0.11),
    "eye_y": (-0.12, 0.05),
    "brow_y": (-0.16, -0.03),
    "brow_tilt": (-0.5, 0.5),
    "nose_y": (0.0, 0.12),
    "mouth_y": (0.08, 0.22),
    "mouth_width": (0.06, 0.2),
    "lip_thickness": (0.005, 0.03),
    "sway": (0.0, 3.0),
}


@dataclass(frozen=True)
class ReferenceModel:
    name: str
    seed: int
    colors: dict[str, tuple[int, int, int]]
    geometry: dict[str, Any]
    path: str = ""


def bundled_model_path(name: str = "reference-avatar.json") -> str:
    """Path of a reference avatar shipped in ``appliance/data``."""
    return str(resources.files("appliance") / "data" / name)


def _parse_color(value: Any) -> tuple[int, int, int] | None:
    if not isinstance(value, str) or not value.startswith("#") or len(value) not in (4, 7):
        return None
    digits = value[1:]
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    try:
        return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))
    except ValueError:
        return None


def load_model(path: str) -> ReferenceModel:
    """Read and validate a reference avatar file; raise ModelMissing / ModelInvalid."""
    p = Path(path)
    fix_missing = "point [avatar] model at a reference avatar .json file, or leave it empty for the bundled one"
    if not p.exists():
        raise ModelMissing(
            f"reference avatar {path} does not exist", setting=SETTING, fix=fix_missing
        )
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ModelMissing(
            f"reference avatar {path} cannot be read ({e.strerror or e})",
            setting=SETTING,
            fix=fix_missing,
        ) from e

    def invalid(what: str) -> ModelInvalid:
        return ModelInvalid(
            f"{path} is not a usable reference avatar: {what}",
            setting=SETTING,
            fix=f"fix the file (format {MODEL_FORMAT!r}, version {MODEL_VERSION}) or point [avatar] model at another",
        )

    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise invalid("the top level must be an object")
    if doc.get("format") != MODEL_FORMAT:
        raise invalid(f'"format" is {doc.get("format")!r}, expected {MODEL_FORMAT!r}')
    if doc.get("version") != MODEL_VERSION:
        raise invalid(
            f'"version" is {doc.get("version")!r}, this appliance reads version {MODEL_VERSION}'
        )
    unknown = sorted(set(doc) - {"format", "version", "name", "seed", "colors", "geometry"})
    if unknown:
        raise invalid(f"unknown key(s) {', '.join(unknown)}")
    name = doc.get("name", p.stem)
    if not isinstance(name, str) or not name.strip():
        raise invalid('"name" must be a non-empty string')
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise invalid('"seed" must be a non-negative integer')

    colors_in = doc.get("colors", {})
    if not isinstance(colors_in, dict):
        raise invalid('"colors" must be an object')
    colors: dict[str, tuple[int, int, int]] = {}
    for key, default in DEFAULT_COLORS.items():
        rgb = _parse_color(colors_in.get(key, default))
        if rgb is None:
            raise invalid(f'colors.{key} is {colors_in.get(key)!r}, expected "#rrggbb"')
        colors[key] = rgb
    extra = sorted(set(colors_in) - set(DEFAULT_COLORS))
    if extra:
        raise invalid(f"unknown colour(s) {', '.join(extra)}; known: {', '.join(DEFAULT_COLORS)}")

    geo_in = doc.get("geometry", {})
    if not isinstance(geo_in, dict):
        raise invalid('"geometry" must be an object')
    extra = sorted(set(geo_in) - set(DEFAULT_GEOMETRY))
    if extra:
        raise invalid(
            f"unknown geometry key(s) {', '.join(extra)}; known: {', '.join(DEFAULT_GEOMETRY)}"
        )
    geometry = dict(DEFAULT_GEOMETRY)
    for key, value in geo_in.items():
        if key == "hair_style":
            if value not in HAIR_STYLES:
                raise invalid(
                    f"geometry.hair_style is {value!r}, expected one of {', '.join(HAIR_STYLES)}"
                )
        else:
            lo, hi = _GEOMETRY_RANGES[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not lo <= value <= hi
            ):
                raise invalid(f"geometry.{key} is {value!r}, expected a number from {lo} to {hi}")
            value = float(value)
        geometry[key] = value
    return ReferenceModel(name=name, seed=seed, colors=colors, geometry=geometry, path=str(path))


# ----------------------------------------------------------------------------- layout
def mouth_box_for(model_path: str, width: int, height: int) -> tuple[int, int, int, int]:
    """:func:`mouth_box` of a model file ("" = the bundled one)."""
    return mouth_box(load_model(model_path or bundled_model_path()), width, height)


# ----------------------------------------------------------------------------- audio


def resample_linear(pcm: np.ndarray, sr_in: int, sr_out: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """One-shot linear-interpolation resampling of int16 mono (output k at input k*sr_in/sr_out)."""
    return StreamResampler(sr_in, sr_out).push(pcm)


class StreamResampler:
    """Chunked linear resampler: the output does not depend on how the input was split."""

    def __init__(self, sr_in: int, sr_out: int = AUDIO_SAMPLE_RATE) -> None:
        self.sr_in, self.sr_out = int(sr_in), int(sr_out)
        self._n_in = 0  # input samples seen
        self._k_out = 0  # output samples made
        self._tail = np.zeros(0, np.int16)  # the last input sample (needed across chunk boundaries)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        if self.sr_in == self.sr_out:
            self._n_in += len(pcm)
            return pcm.astype(np.int16, copy=True)
        if len(pcm) == 0:
            return np.zeros(0, np.int16)
        buf = np.concatenate([self._tail, pcm]).astype(np.float64)
        base = self._n_in - len(self._tail)  # global index of buf[0]
        self._n_in += len(pcm)
        last = self._n_in - 1
        k_end = (last * self.sr_out) // self.sr_in  # last k with k*sr_in/sr_out <= last
        ks = np.arange(self._k_out, k_end + 1, dtype=np.int64)
        self._k_out = k_end + 1
        self._tail = pcm[-1:].astype(np.int16)
        if len(ks) == 0:
            return np.zeros(0, np.int16)
        num = ks * self.sr_in
        i0 = num // self.sr_out - base
        frac = (num % self.sr_out) / self.sr_out
        i1 = np.minimum(i0 + 1, len(buf) - 1)
        out = buf[i0] + (buf[i1] - buf[i0]) * frac
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


# ----------------------------------------------------------------------------- runtime


class ReferenceRuntime(Runtime):
    """Procedural avatar at ``width``×``height`` and ``fps``; see the module docstring."""

    name = "reference"

    def __init__(
        self, width: int = 512, height: int = 512, fps: float = 25.0, *, seed: int | None = None
    ) -> None:
        if width < 16 or height < 16 or fps <= 0:
            raise ValueError(f"bad video size/rate {width}x{height}@{fps}")
        self._spec = VideoSpec(int(width), int(height), float(fps))
        self._seed_override = seed
        self.model: ReferenceModel | None = None
        self._closed = False
        self._n = 0  # next frame index
        # speech queue (16 kHz int16) and stream positions in samples
        self._queue: deque[np.ndarray] = deque()
        self._queued = 0  # samples in the queue
        self._pushed = 0  # samples ever queued
        self._played = 0  # samples ever played
        self._eos_marks: deque[int] = deque()  # stream positions where a reply ends
        self._resampler: StreamResampler | None = None
        # mouth state, smoothed
        self._open = 0.0
        self._wide = 0.5
        self._blinks: list[int] = []
        self._blink_rng = np.random.default_rng(0)

    # -- Runtime API

    @property
    def video(self) -> VideoSpec:
        return self._spec

    async def open(self, model_path: str) -> None:
        """Load a reference avatar file ("" = the bundled one) and pre-render it."""
        model = load_model(model_path or bundled_model_path())
        self._prepare(model)

    async def push_audio(self, pcm16: bytes, sample_rate: int, last_chunk: bool = False) -> None:
        """Queue speech; ``last_chunk=True`` also ends the reply, like flush()."""
        if sample_rate <= 0:
            raise ValueError(f"bad sample rate {sample_rate}")
        pcm = np.frombuffer(pcm16, dtype="<i2", count=len(pcm16) // 2)
        if self._resampler is None or self._resampler.sr_in != sample_rate:
            self._resampler = StreamResampler(sample_rate)
        self._enqueue(self._resampler.push(pcm))
        if last_chunk:
            await self.flush()

    async def flush(self) -> None:
        self._resampler = None  # the next reply starts a fresh stream
        self._eos_marks.append(self._pushed)

    async def interrupt(self) -> None:
        self._queue.clear()
        self._played += self._queued
        self._queued = 0
        self._eos_marks.clear()
        self._resampler = None

    async def frames(self) -> AsyncIterator[Frame]:
        """One frame per 1/fps on a monotonic schedule (frame n at t0 + n/fps).

        Behind schedule it skips the sleep, not the frame, and so catches up after a
        short stall; but by at most ``MAX_CATCH_UP_S``: frames owed for longer (CPU
        overload, a long stall) are forgotten, not rendered in a burst that would only
        pile up downstream or be dropped there with the speech they carry."""
        if self.model is None:
            raise RuntimeError("ReferenceRuntime.frames() before open()")
        t0 = time.monotonic()
        n = 0
        period = 1.0 / self._spec.fps
        while not self._closed:
            delay = t0 + n * period - time.monotonic()
            if delay < -MAX_CATCH_UP_S:
                t0 -= delay + MAX_CATCH_UP_S  # frame n is now due MAX_CATCH_UP_S ago
            await asyncio.sleep(max(delay, 0.0))
            if self._closed:
                return
            yield self.next_frame()
            n += 1

    async def close(self) -> None:
        self._closed = True

    # -- extras

    def mouth_box(self) -> tuple[int, int, int, int]:
        if self.model is None:
            raise RuntimeError("mouth_box() before open()")
        return mouth_box(self.model, self._spec.width, self._spec.height)

    @property
    def speaking(self) -> bool:
        return self._queued > 0

    def next_frame(self) -> Frame:
        """Take the next audio slice and render the frame that goes with it (no pacing)."""
        spf = self._spec.samples_per_frame
        audio = np.zeros(spf, np.int16)
        took = 0
        while took < spf and self._queue:
            head = self._queue[0]
            k = min(spf - took, len(head))
            audio[took : took + k] = head[:k]
            took += k
            if k == len(head):
                self._queue.popleft()
            else:
                self._queue[0] = head[k:]
        self._queued -= took
        self._played += took
        eos = False
        while self._eos_marks and self._eos_marks[0] <= self._played:
            self._eos_marks.popleft()
            eos = True
        image = self._render(audio if took else None)
        self._n += 1
        return Frame(
            image=image,
            audio=audio,
            speaking=took > 0,
            end_of_speech=eos,
            meta={"runtime": self.name, "model": self.model.name if self.model else ""},
        )

    # -- internals

    def _enqueue(self, pcm: np.ndarray) -> None:
        if len(pcm):
            self._queue.append(pcm)
            self._queued += len(pcm)
            self._pushed += len(pcm)

    def _prepare(self, model: ReferenceModel) -> None:
        w, h = self._spec.width, self._spec.height
        lay = layout(model, w, h)
        self.model, self._lay = model, lay
        self._bg = background(model, w, h)
        self._body = body(model, lay, w, h)
        self._headl = head(model, lay, w, h)
        seed = model.seed if self._seed_override is None else self._seed_override
        self._blink_rng = np.random.default_rng(seed)
        self._phase = float(np.random.default_rng(seed + 1).uniform(0, 2 * math.pi))
        self._blinks = []
        self._next_blink = int(self._spec.fps * float(self._blink_rng.uniform(1.0, 3.0)))
        # eyelid and mouth regions: fixed grids relative to their centres
        m = 2.0 + lay.s * 0.006
        ex0, ey0 = -lay.eye_a - m, -lay.eye_b - m
        gy, gx = np.mgrid[
            0 : int(math.ceil(2 * (lay.eye_b + m))), 0 : int(math.ceil(2 * (lay.eye_a + m)))
        ].astype(np.float32)
        self._eye_grid = (gx + ex0 + 0.5, gy + ey0 + 0.5, ex0, ey0)
        self._eye_mask = cov_ellipse(
            gx + ex0 + 0.5, gy + ey0 + 0.5, 0, 0, lay.eye_a + 1.2, lay.eye_b + 1.2
        )
        mo = max_open(lay)
        mx0, my0 = -lay.mouth_a - lay.lip - 2, -0.8 * mo - lay.lip - 2
        gy, gx = np.mgrid[
            0 : int(math.ceil(2.12 * mo + 2 * lay.lip + 4)),
            0 : int(math.ceil(2 * (lay.mouth_a + lay.lip + 2))),
        ].astype(np.float32)
        self._mouth_grid = (gx + mx0 + 0.5, gy + my0 + 0.5, mx0, my0)
        self._open = 0.0
        self._wide = 0.5

    def _blink(self, n: int) -> float:
        """Eyelid closure 0..1 at frame n: blinks at seeded, random-looking intervals."""
        fps = self._spec.fps
        while self._next_blink <= n + fps:  # schedule ahead
            self._blinks.append(self._next_blink)
            if self._blink_rng.random() < 0.2:  # sometimes a double blink
                self._blinks.append(self._next_blink + int(0.35 * fps))
            self._next_blink += int(fps * float(self._blink_rng.uniform(2.2, 5.5)))
        self._blinks = [b for b in self._blinks if b > n - fps]
        closure = 0.0
        for start in self._blinks:
            t = (n - start) / fps
            if 0 <= t < 0.08:
                closure = max(closure, t / 0.08)
            elif 0.08 <= t < 0.12:
                closure = 1.0
            elif 0.12 <= t < 0.24:
                closure = max(closure, 1.0 - (t - 0.12) / 0.12)
        return closure

    def _mouth_target(self, audio: np.ndarray | None) -> tuple[float, float]:
        if audio is None:
            return 0.0, self._wide
        x = audio.astype(np.float32) / 32768.0
        rms = float(np.sqrt(np.mean(x * x)))
        level = (
            20 * math.log10(rms + 1e-9) + 48.0
        ) / 32.0  # -48 dBFS -> closed, -16 dBFS -> fully open
        openness = min(max(level, 0.0), 1.0)
        spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        freqs = np.fft.rfftfreq(len(x), 1.0 / AUDIO_SAMPLE_RATE)
        total = float(spec.sum())
        centroid = float((spec * freqs).sum() / total) if total > 1e-6 else 1500.0
        wide = min(max((centroid - 600.0) / 2400.0, 0.0), 1.0)  # "oo" ~ round, "ee"/"s" ~ wide
        return openness, wide

    def _render(self, audio: np.ndarray | None) -> np.ndarray:
        lay, c, n = self._lay, self.model.colors if self.model else {}, self._n
        fps = self._spec.fps
        t = n / fps
        target_open, target_wide = self._mouth_target(audio)
        k = 0.6 if target_open > self._open else 0.35  # quick to open, slower to close
        self._open += (target_open - self._open) * k
        if self._open < 0.004:
            self._open = 0.0
        self._wide += (target_wide - self._wide) * 0.3
        # resting motion: slow sway, breathing, a small nod with speech
        sw = lay.sway_px
        dx = round(
            sw
            * (
                2.2 * math.sin(2 * math.pi * t / 7.3 + self._phase)
                + 0.8 * math.sin(2 * math.pi * t / 3.1)
            )
        )
        breath = math.sin(2 * math.pi * t / 4.2 + self._phase)
        dy = round(sw * (SWAY_UP * breath + (SWAY_DOWN - SWAY_UP) * self._open))
        frame = self._bg.copy()
        blit(frame, self._body, 0, round(sw * 0.8 * breath))
        blit(frame, self._headl, dx, dy)
        closure = self._blink(n)
        if closure > 0:
            for side in (-1, 1):
                self._draw_lid(
                    frame, lay.cx + side * lay.eye_dx + dx, lay.cy + lay.eye_y + dy, closure, c
                )
        self._draw_mouth(frame, lay.cx + dx, lay.cy + lay.mouth_y + dy, c)
        return frame

    def _roi(
        self, frame: np.ndarray, cx: float, cy: float, ox: float, oy: float, shape: tuple[int, ...]
    ) -> tuple[np.ndarray, tuple[slice, slice]] | None:
        x0, y0 = int(round(cx + ox)), int(round(cy + oy))
        h, w = shape[:2]
        fx0, fy0, fx1, fy1 = (
            max(x0, 0),
            max(y0, 0),
            min(x0 + w, frame.shape[1]),
            min(y0 + h, frame.shape[0]),
        )
        if fx1 <= fx0 or fy1 <= fy0:
            return None
        return frame[fy0:fy1, fx0:fx1], (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))

    def _draw_lid(
        self,
        frame: np.ndarray,
        ex: float,
        ey: float,
        closure: float,
        c: dict[str, tuple[int, int, int]],
    ) -> None:
        gx, gy, ox, oy = self._eye_grid
        roi = self._roi(frame, ex, ey, ox, oy, gx.shape)
        if roi is None:
            return
        dst, sl = roi
        lay = self._lay
        edge = (
            -lay.eye_b - 1.2 + (2 * lay.eye_b + 2.4) * closure
        )  # lid edge, relative to the eye centre
        lid = np.clip(edge - gy[sl] + 0.5, 0, 1) * self._eye_mask[sl]
        lash = np.clip(1.6 - np.abs(gy[sl] - edge), 0, 1) * self._eye_mask[sl] * (closure > 0.05)
        out = dst.astype(np.float32)
        out += (np.asarray(c["skin"], np.float32) - out) * lid[..., None]
        out += (np.asarray(c["brows"], np.float32) - out) * lash[..., None]
        np.copyto(dst, out, casting="unsafe")

    def _draw_mouth(
        self, frame: np.ndarray, mx: float, my: float, c: dict[str, tuple[int, int, int]]
    ) -> None:
        gx, gy, ox, oy = self._mouth_grid
        roi = self._roi(frame, mx, my, ox, oy, gx.shape)
        if roi is None:
            return
        dst, sl = roi
        X, Y = gx[sl], gy[sl]
        lay, o, wide = self._lay, self._open, self._wide
        roundness = (1.0 - wide) * o
        a_in = lay.mouth_a * (0.78 + 0.22 * wide - 0.3 * roundness)
        b_in = 0.6 + max_open(lay) * o * (0.8 + 0.25 * (1 - wide))
        cy_in = b_in * 0.25  # the jaw drops: the opening grows downwards
        a_out, b_out = a_in + lay.lip * 0.9, b_in + lay.lip
        out = dst.astype(np.float32)

        def paint(cov: np.ndarray, col: tuple[int, int, int]) -> None:
            out[...] += (np.asarray(col, np.float32) - out) * cov[..., None]

        paint(cov_ellipse(X, Y, 0, cy_in, a_out, b_out), c["lips"])
        inner = cov_ellipse(X, Y, 0, cy_in, a_in, b_in)
        paint(inner, c["mouth"])
        if b_in > 2.0:
            teeth_edge = cy_in - b_in + max(1.0, b_in * 0.38)
            paint(inner * np.clip(teeth_edge - Y + 0.5, 0, 1), c["teeth"])
            paint(
                inner * cov_ellipse(X, Y, 0, cy_in + b_in * 0.95, a_in * 0.55, b_in * 0.45),
                c["tongue"],
            )
        np.copyto(dst, out, casting="unsafe")
