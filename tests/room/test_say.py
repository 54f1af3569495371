"""`appliance say`: the avatar speaks a WAV file with no agent (issue 11's booted screen test
uses it; issue 16's local speak grows from it).

Real parts: the kiosk (`appliance run`) in the dev server's room, a viewer that watches and
listens to it, and `appliance say` as an operator types it.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np

from appliance.dev.bench import KioskProcess, write_kiosk_config
from appliance.dev.demo import Viewer, make_token
from appliance.runtimes.reference import mouth_box_for, mouth_open_fraction
from appliance.supervisor import bundled_model

KIOSK = "kiosk-say"
ROOM = "lobby"
SPEECH = Path(__file__).resolve().parent.parent / "runtimes" / "data" / "speech.wav"


def say(kiosk: KioskProcess, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "appliance", "say", *args, "--socket", kiosk.socket],
                          input=stdin, capture_output=True, timeout=30)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def repeated(times: int) -> bytes:
    """The test sentence ``times`` over, as one WAV file."""
    with wave.open(str(SPEECH), "rb") as wav:
        params, frames = wav.getparams(), wav.readframes(wav.getnframes())
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setparams(params)
        wav.writeframes(frames * times)
    return out.getvalue()


def loud_since(viewer: Viewer, t0: float, level: int = 3000) -> list[float]:
    """When the viewer heard the kiosk loudly after ``t0``."""
    return [t for a, t in zip(viewer.audio, viewer.audio_times, strict=True)
            if t > t0 and np.abs(a).max() > level]


async def test_say_speaks_through_the_avatar_and_stop_silences_it(devserver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = write_kiosk_config(tmp_path, url=devserver.url, api_key=devserver.api_key,
                                api_secret=devserver.api_secret, room=ROOM, identity=KIOSK)
    kiosk = KioskProcess(config, tmp_path / "kiosk.log")
    kiosk.start()
    viewer = Viewer(KIOSK)
    try:
        await kiosk.async_wait_for(lambda s: s["room"]["state"] == "live" and s["fps_10s"] > 0, 60, "went live")
        await viewer.connect(devserver.url, make_token(devserver.api_key, devserver.api_secret, ROOM, "viewer",
                                                       hidden=True))
        await asyncio.wait_for(viewer.video_started.wait(), 20)
        box = mouth_box_for(bundled_model(), 512, 512)
        await asyncio.sleep(1.0)
        idle = max(mouth_open_fraction(f.image, box) for f in viewer.frames[-25:])

        # a WAV file: heard by the viewer, and the mouth moves with it
        asked = time.monotonic()
        code, out, err = await asyncio.to_thread(say, kiosk, str(SPEECH))
        assert code == 0 and out.startswith("speaking 1.45 s"), (out, err)
        while not loud_since(viewer, asked):
            assert time.monotonic() - asked < 15, "the viewer never heard the speech"
            await asyncio.sleep(0.05)
        first = loud_since(viewer, asked)[0]
        await asyncio.sleep(1.0)
        mouths = [mouth_open_fraction(f.image, box) for f in viewer.frames if f.at > first]
        print(f"\nappliance say → first loud audio at the viewer {first - asked:.2f} s; mouth open "
              f"idle {idle:.3f}, speaking max {max(mouths):.3f} min {min(mouths):.3f}")
        assert max(mouths) > max(0.06, 2 * idle), "the mouth did not open with the speech"
        assert max(mouths) - min(mouths) > 0.03, "the mouth did not move with the speech"

        # six times over from standard input, then --stop: silent at once
        code, out, err = await asyncio.to_thread(say, kiosk, "-", stdin=repeated(6))
        assert code == 0 and out.startswith("speaking 8.7 s"), (out, err)
        await asyncio.sleep(2.0)
        assert loud_since(viewer, time.monotonic() - 0.5), "the long speech is not playing"
        code, out, err = await asyncio.to_thread(say, kiosk, "--stop")
        stopped = time.monotonic()  # the command has answered: the daemon has stopped the speech
        assert code == 0 and out.strip() == "stopped", (out, err)
        await asyncio.sleep(2.0)
        late = [t - stopped for t in loud_since(viewer, stopped)]
        print(f"--stop: last loud audio at the viewer {max(late, default=0.0):.2f} s after it answered")
        assert max(late, default=0.0) < 1.0, "the speech went on after --stop"

        # bad input: one line with the fix, nothing else changes
        text = tmp_path / "notes.txt"
        text.write_text("hello\n")
        code, out, err = await asyncio.to_thread(say, kiosk, str(text))
        [line] = err.strip().splitlines()
        assert code == 1 and line.startswith("appliance say: not a PCM WAV file") and "sox" in line, line
        code, out, err = await asyncio.to_thread(say, kiosk, str(tmp_path / "missing.wav"))
        assert code == 1 and "cannot read" in err, err
        status = await asyncio.to_thread(kiosk.status)
        assert status["room"]["state"] == "live" and status["fps_10s"] > 10, status
    finally:
        await viewer.close()
        stopped_with = await asyncio.to_thread(kiosk.stop)
    assert stopped_with == 0, kiosk.log()[-3000:]
