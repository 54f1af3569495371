"""When a staged model goes live: waits for silence, judges health, goes back on failure."""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from pathlib import Path

from appliance.config import parse_layers
from appliance.models.manifest import generate_keypair, load_private_key, publish
from appliance.models.rollout import ModelUpdates
from appliance.models.store import ModelEntry

AVATAR = Path(str(resources.files("appliance") / "data" / "reference-avatar.json"))


def make(tmp_path: Path, *, healthy: list[bool], idle: list[bool], swaps: list[str],
         fail_swap: bool = False) -> ModelUpdates:
    private, public, _ = generate_keypair(tmp_path / "keys")
    key = load_private_key(private)
    publish(AVATAR, tmp_path / "served", "", key, "host", "1", "reference")
    config = parse_layers([("t.toml", f"""
[models]
directory = "{tmp_path / 'models'}"
manifest_url = "{tmp_path / 'served' / 'manifest.json'}"
public_key = "{public.read_text().strip()}"
warmup_timeout_s = 5.0
""")])

    async def swap(entry: ModelEntry | None, deadline_s: float) -> str | None:
        swaps.append(entry.version if entry else "configured")
        return "no frame within 5 s" if fail_swap else None

    return ModelUpdates(config, swap=swap, is_idle=lambda: idle[0], healthy=lambda: healthy[0])


async def test_waits_until_the_avatar_stops_speaking(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("appliance.models.rollout.SOAK_S", 0.5)
    idle, swaps = [False], []
    updates = make(tmp_path, healthy=[True], idle=idle, swaps=swaps)
    task = asyncio.create_task(updates.check_and_apply())
    await asyncio.sleep(2.5)
    assert swaps == [] and updates.waiting_for == "the avatar to finish speaking"
    idle[0] = True
    await asyncio.wait_for(task, 10)
    assert swaps == ["1"]
    assert updates.store.current().version == "1" and updates.store.current().confirmed


async def test_a_model_that_does_not_warm_is_marked_bad_and_not_retried(tmp_path: Path) -> None:
    swaps: list[str] = []
    updates = make(tmp_path, healthy=[True], idle=[True], swaps=swaps, fail_swap=True)
    await updates.check_and_apply()
    assert swaps == ["1"]
    assert updates.store.current() is None
    assert updates.store.bad_reason("1") == "no frame within 5 s"
    await updates.check_and_apply()  # the same version again: never retried
    assert swaps == ["1"]


async def test_unhealthy_during_soak_goes_back(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("appliance.models.rollout.SOAK_S", 1.0)
    healthy, swaps = [True], []
    updates = make(tmp_path, healthy=healthy, idle=[True], swaps=swaps)
    start = time.monotonic()

    async def break_it() -> None:
        await asyncio.sleep(0.3)
        healthy[0] = False

    await asyncio.gather(updates.check_and_apply(), break_it())
    assert time.monotonic() - start < 5
    assert updates.store.bad_reason("1") is not None
    assert updates.store.current() is None  # there was nothing before: the config's model serves
    assert swaps == ["1", "configured"]
