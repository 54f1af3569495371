"""Model updates in a live room: the swap shows no gap, bad models never go live, rollback works.

The kiosk daemon pulls from a signed manifest on a local path (the USB/offline
form of `[models] manifest_url`); a viewer in the room counts frames through
every switch and tells the two avatars apart by their background colour.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from appliance.dev.bench import KioskProcess, write_kiosk_config
from appliance.dev.demo import Viewer, make_token
from appliance.models.manifest import generate_keypair, load_private_key, publish

KIOSK, ROOM = "kiosk-models", "lobby"
AVATAR_A = Path(str(resources.files("appliance") / "data" / "reference-avatar.json"))
AVATAR_B = Path(str(resources.files("appliance") / "data" / "reference-avatar-b.json"))


def _background(image: np.ndarray) -> np.ndarray:
    return image[4:24, 4:24].reshape(-1, 3).mean(axis=0)


@pytest.fixture
async def updating_kiosk(devserver, tmp_path: Path) -> AsyncIterator[tuple[KioskProcess, Path, object]]:  # type: ignore[no-untyped-def]
    private, public, _ = generate_keypair(tmp_path / "keys")
    key = load_private_key(private)
    served = tmp_path / "served"
    publish(AVATAR_A, served, "", key, "lobby-host", "1", "reference")
    config = write_kiosk_config(
        tmp_path, url=devserver.url, api_key=devserver.api_key, api_secret=devserver.api_secret,
        room=ROOM, identity=KIOSK,
        extra=(f'[models]\ndirectory = "{tmp_path / "models"}"\n'
               f'manifest_url = "{served / "manifest.json"}"\n'
               f'public_key = "{public.read_text().strip()}"\n'
               "warmup_timeout_s = 20.0\n"),
    )
    kiosk = KioskProcess(config, tmp_path / "kiosk.log")
    kiosk.start()
    try:
        await kiosk.async_wait_for(
            lambda s: s["room"]["state"] == "live" and (s["models"] or {}).get("current") == "1"
            and s["fps_10s"] > 20, 60, "went live on model 1")
        yield kiosk, served, key
    finally:
        assert await asyncio.to_thread(kiosk.stop) == 0, kiosk.log()[-3000:]


def _current(status: dict) -> str | None:  # type: ignore[type-arg]
    return (status.get("models") or {}).get("current")


async def test_swap_in_a_live_room(devserver, updating_kiosk) -> None:  # type: ignore[no-untyped-def]
    kiosk, served, key = updating_kiosk
    viewer = Viewer(KIOSK)
    await viewer.connect(devserver.url, make_token(devserver.api_key, devserver.api_secret, ROOM, "viewer"))
    await asyncio.wait_for(viewer.video_started.wait(), 20)
    await asyncio.sleep(3.0)
    baseline_start = time.monotonic() - 2.5
    baseline_ms = viewer.max_interval_ms(baseline_start, time.monotonic())
    background_a = _background(viewer.frames[-1].image)

    # -- a new model is published: pulled, verified, warmed beside the old, swapped
    publish(AVATAR_B, served, "", key, "lobby-host", "2", "reference")
    swap_start = time.monotonic()
    os.kill(kiosk.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
    status = await kiosk.async_wait_for(lambda s: _current(s) == "2", 30, "switched to model 2")
    await asyncio.sleep(1.0)
    swap_ms = viewer.max_interval_ms(swap_start, time.monotonic())
    background_b = _background(viewer.frames[-1].image)
    print(f"\nmax frame interval at the subscriber: around the swap {swap_ms:.0f} ms, "
          f"baseline (no swap) {baseline_ms:.0f} ms")
    assert np.abs(background_b - background_a).max() > 20, (background_a, background_b)
    # the gap itself is a number for the benchmark notes, not a timed assertion that flakes on
    # a busy machine; what must hold is that the room never went dark
    assert swap_ms < 1000, "the room went dark during the swap"
    assert status["renderer"]["restarts"] == 0
    await kiosk.async_wait_for(lambda s: s["models"]["confirmed"] is True, 15, "confirmed model 2")

    # -- a model that fails to load is marked bad and never goes live
    broken = served.parent / "broken.json"
    broken.write_text('{"format": "appliance-reference-avatar", "version": 1, "geometry": {"head_width": -4}}')
    publish(broken, served, "", key, "lobby-host", "3", "reference")
    os.kill(kiosk.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
    await kiosk.async_wait_for(lambda s: "3" in s["models"]["bad"], 30, "marked model 3 bad")
    await asyncio.sleep(1.0)
    assert _current(kiosk.status()) == "2"
    assert viewer.max_interval_ms(time.monotonic() - 3, time.monotonic()) < 500

    # -- `appliance models list` tells the truth; rollback goes back to model 1, live
    listing = subprocess.run([sys.executable, "-m", "appliance", "models", "list", "--json",
                              "--config", str(kiosk.config)], capture_output=True, text=True, check=True)
    states = {m["version"]: m["state"] for m in json.loads(listing.stdout)}
    assert states == {"1": "previous", "2": "current", "3": "bad"}, states
    rollback_start = time.monotonic()
    subprocess.run([sys.executable, "-m", "appliance", "models", "rollback", "--config", str(kiosk.config)],
                   check=True, capture_output=True)
    # the store switches at once; the daemon then warms model 1 and swaps to it
    await kiosk.async_wait_for(lambda s: _current(s) == "1" and "lobby-host-1" in (s["model"] or ""), 30,
                               "rolled back to model 1")
    # the viewer shows model 1 again (a busy machine may take a few seconds to get the frames out)
    deadline = time.monotonic() + 10
    while np.abs(_background(viewer.frames[-1].image) - background_a).max() >= 12:
        assert time.monotonic() < deadline, (_background(viewer.frames[-1].image), background_a)
        await asyncio.sleep(0.2)
    print(f"max frame interval around the rollback: {viewer.max_interval_ms(rollback_start, time.monotonic()):.0f} ms")
    await viewer.close()
