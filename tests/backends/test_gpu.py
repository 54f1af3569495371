"""The GPU rung's requests, against a fake of bitHuman's GPU container (issue 13).

The fake takes what livekit-plugins-bithuman itself sends to a self-hosted container (its
multipart builder, run offline against the fake), and the kiosk's request must match it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from appliance.backends.cloud import RungFailed
from appliance.backends.gpu import GpuRung
from appliance.config import Secret
from appliance.dev.fake_bithuman import HANG, Fault
from appliance.dev.fake_gpu import FakeGpu

URL, ROOM, TOKEN = "ws://10.0.0.1:7880", "lobby", "worker-token"


@pytest.fixture
async def gpu() -> AsyncIterator[FakeGpu]:
    fake = FakeGpu(spawn_workers=False)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def portrait(tmp_path: Path) -> Path:
    path = tmp_path / "portrait.jpg"
    Image.new("RGB", (64, 64), (200, 150, 120)).save(path, format="JPEG")
    return path


def rung(fake: FakeGpu, image: str = "", secret: Secret | None = None, **timing: float) -> GpuRung:
    return GpuRung(fake.url, "kiosk-7", image, secret, **timing)


async def test_a_task_starts_and_stops_with_the_plugins_request(gpu: FakeGpu, portrait: Path) -> None:
    from livekit.agents.utils import http_context
    from livekit.plugins import bithuman

    async with http_context.open():  # type: ignore[attr-defined]
        plugin = bithuman.AvatarSession(api_url=gpu.url + "/launch?async=true", model="expression",
                                        avatar_image=Image.open(portrait), api_secret="unused")
        await plugin._start_cloud_agent(URL, TOKEN, ROOM)
    [plugin_task] = gpu.tasks.values()

    gpu_rung = rung(gpu, str(portrait))
    task_id = await gpu_rung.launch(URL, ROOM, TOKEN)
    task = gpu.tasks[task_id]
    print(f"\nthe plugin sent {sorted(plugin_task.fields)} + avatar_image; the kiosk {sorted(task.fields)}")
    assert [(m, p) for m, p, _ in gpu.requests[-2:]] == [("GET", "/ready"), ("POST", "/launch")]
    assert task.fields == plugin_task.fields  # the same fields, the same values
    assert task.image == portrait.read_bytes() and plugin_task.image is not None
    assert "authorization" not in gpu.requests[-1][2]  # no gateway token configured: none sent
    assert gpu_rung.worker_identity == "kiosk-7-gpu"
    await gpu_rung.end(task_id)
    assert task.status == "cancelled" and gpu.requests[-1][:2] == ("POST", f"/tasks/{task_id}/stop")


async def test_a_url_portrait_and_a_gateway_token(gpu: FakeGpu) -> None:
    task_id = await rung(gpu, "https://example.invalid/face.png", Secret("gw-token", "f")).launch(URL, ROOM, TOKEN)
    assert gpu.tasks[task_id].fields["avatar_image_url"] == "https://example.invalid/face.png"
    assert gpu.requests[-1][2]["authorization"] == "Bearer gw-token"


async def test_a_container_still_warming_up_is_skipped_at_once(gpu: FakeGpu) -> None:
    gpu.warmup_s = 60.0
    gpu_rung = rung(gpu)
    with pytest.raises(RungFailed) as skipped:
        await gpu_rung.launch(URL, ROOM, TOKEN)
    assert gpu_rung.attempts == 1 and not skipped.value.retryable and not gpu.tasks
    assert "not ready" in str(skipped.value) and "not_ready" in str(skipped.value), skipped.value
    assert skipped.value.setting == "[fallback] gpu_api_url"


async def test_a_full_container_is_skipped_at_once(gpu: FakeGpu) -> None:
    gpu.script.append(Fault(503, "at_capacity"))  # full between /ready and /launch
    gpu_rung = rung(gpu)
    with pytest.raises(RungFailed) as skipped:
        await gpu_rung.launch(URL, ROOM, TOKEN)
    assert gpu_rung.attempts == 2 and not skipped.value.retryable and "at_capacity" in str(skipped.value)


async def test_503_with_retry_after_is_retried_then_served(gpu: FakeGpu) -> None:
    gpu.script.extend([Fault(503, "not_ready", retry_after=0.3)] * 2)
    gpu_rung = rung(gpu)
    started = time.monotonic()
    task_id = await gpu_rung.launch(URL, ROOM, TOKEN)
    waited = time.monotonic() - started
    print(f"\n503 x2 with Retry-After 0.3 s: served after {waited:.2f} s, {gpu_rung.attempts} requests")
    assert task_id in gpu.tasks and gpu_rung.attempts == 4 and waited >= 0.6


async def test_a_launch_that_hangs_times_out_and_gives_up(gpu: FakeGpu) -> None:
    gpu.script.extend([HANG, HANG, HANG])
    gpu_rung = rung(gpu, attempt_timeout_s=0.5, retry_for_s=2.0)
    started = time.monotonic()
    with pytest.raises(RungFailed) as gave_up:
        await gpu_rung.launch(URL, ROOM, TOKEN)
    took = time.monotonic() - started
    print(f"\nhanging launch: gave up after {took:.2f} s, {gpu_rung.attempts} requests")
    assert gave_up.value.retryable and "no answer within 0.5 s" in str(gave_up.value) and took < 5


async def test_a_bad_portrait_names_the_setting(gpu: FakeGpu, tmp_path: Path) -> None:
    with pytest.raises(RungFailed) as unreadable:
        await rung(gpu, str(tmp_path / "missing.jpg")).launch(URL, ROOM, TOKEN)
    assert unreadable.value.setting == "[fallback] gpu_avatar_image" and "cannot read" in str(unreadable.value)
    not_an_image = tmp_path / "face.jpg"
    not_an_image.write_text("hello")
    with pytest.raises(RungFailed) as refused:
        await rung(gpu, str(not_an_image)).launch(URL, ROOM, TOKEN)
    assert refused.value.operator_line().startswith("[fallback] gpu_avatar_image: GPU container answered 400")
    assert not gpu.tasks
