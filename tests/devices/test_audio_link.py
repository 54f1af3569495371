"""The audio child through its supervisor-side link, on ALSA file PCMs (no room).

Barge-in flushes the child's speaker queue; with mic_when = "presence" the
microphone is muted until someone is there; a volume change reaches the child.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from acoustics import prefill_mic, write_asoundrc

from appliance.devices.audio_link import AudioLink, AudioSettings
from appliance.runtimes import Frame

IMAGE = np.zeros((4, 4, 3), np.uint8)


@pytest.fixture
async def link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AudioLink]:
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(write_asoundrc(tmp_path)))  # the child inherits it
    monkeypatch.setenv("JACK_NO_START_SERVER", "1")
    prefill_mic(tmp_path, seconds=30)
    link = AudioLink(AudioSettings(speaker="kiosk_speaker", microphone="kiosk_mic", volume=1.0,
                                   echo_cancellation=True, noise_suppression=True, mic_when="presence"),
                     tokens=None)
    task = asyncio.create_task(link.run())
    try:
        await _until(lambda: link.status()["speaker_device"] and link.status()["microphone_device"], 20)
        yield link
    finally:
        await link.close()
        task.cancel()


async def _until(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _tone_s(tmp_path: Path) -> float:
    """Seconds of tone in everything the speaker played."""
    played = np.concatenate([np.fromfile(f, np.int16) for f in sorted(tmp_path.glob("speaker.raw*"))])
    blocks = played[:len(played) // 160 * 160].reshape(-1, 160).astype(np.float64)
    return float(np.sum(np.sqrt(np.mean(blocks ** 2, axis=1)) > 1000) / 100)


async def test_barge_in_flushes_the_speaker_queue(link: AudioLink, tmp_path: Path) -> None:
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(640) / 16000)).astype(np.int16)

    async def burst(clear: bool) -> float:
        before = _tone_s(tmp_path)
        for _ in range(5):  # 200 ms at once: the speaker's whole queue
            await link.send_frame(Frame(IMAGE, tone))
        if clear:
            link.drop_audio()
        await asyncio.sleep(0.8)
        return _tone_s(tmp_path) - before

    played = await burst(clear=False)
    cleared = await burst(clear=True)
    print(f"\ntone played: {played * 1000:.0f} ms without barge-in, {cleared * 1000:.0f} ms with it")
    assert played >= 0.15
    assert cleared <= 0.08


async def test_presence_unmutes_the_microphone(link: AudioLink) -> None:
    assert link.status()["microphone"] == "muted"  # nobody there yet
    link.set_presence(True)
    await _until(lambda: link.status()["microphone"] == "live", 5)
    link.set_presence(False)
    await _until(lambda: link.status()["microphone"] == "muted", 5)
    aec = link.status()["echo_canceller"]
    assert aec["echo_cancellation"] and aec["near_frames"] > 0  # the canceller runs while muted too
