"""Echo cancellation on synthetic echo, and the 10 ms slicing that keeps the APM from aborting.

The far end (the avatar's espeak-ng voice) goes through a synthetic room (60 ms
delay, direct path + 250 ms exponential tail, -3 dB) into the "microphone",
with -70 dBFS noise; the visitor is a second espeak-ng voice. Everything goes
through :class:`EchoCanceller` exactly as the audio child uses it, fed in the
odd chunk sizes a sound card hands out, so the slicing is exercised too.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from voices import avatar_voice, db, echo_of, energy, room_response, visitor_voice

from appliance.devices.aec import FRAME_10MS, EchoCanceller, TenMs

RATE = 16000
CHUNKS = [160, 320, 441, 100, 7, 333, 480, 1]  # what devices hand out: rarely 10 ms


def _run(aec: EchoCanceller, far: np.ndarray, mic: np.ndarray, delay_ms: float,
         feed_far: bool = True) -> np.ndarray:
    """Play ``far`` and capture ``mic`` in lockstep, in odd chunk sizes; the cleaned mic."""
    out, pos, i = [], 0, 0
    while pos < len(mic):
        size = CHUNKS[i % len(CHUNKS)]
        i += 1
        if feed_far:
            aec.far_end(np.rint(far[pos:pos + size]).astype(np.int16))
        out.append(aec.near_end(np.rint(mic[pos:pos + size]).astype(np.int16), delay_ms))
        pos += size
    return np.concatenate(out).astype(np.float64)


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far end, echo at the microphone, noise): the avatar's voice twice, ~16 s."""
    voice = avatar_voice()
    far = np.concatenate([voice, np.zeros(RATE // 2), voice])
    echo = echo_of(far, room_response(delay_ms=60, gain_db=-3))
    noise = np.random.default_rng(1).standard_normal(len(far)) * 32767 * 10 ** (-70 / 20)
    return far, echo, noise


def test_ten_ms_slicing_keeps_every_sample_in_order() -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(-32768, 32767, 20000).astype(np.int16)
    slicer, frames, pos = TenMs(), [], 0
    for size in [1, 99, 159, 160, 161, 441, 0, 1000, 3, 7]:
        frames += slicer.push(data[pos:pos + size])
        pos += size
    assert all(len(f) == FRAME_10MS for f in frames)
    assert len(frames) * FRAME_10MS + slicer.pending == pos
    assert np.array_equal(np.concatenate(frames), data[:len(frames) * FRAME_10MS])


def test_odd_sizes_never_reach_the_apm_but_would_abort_it() -> None:
    """The hazard is real (a raw 100-sample frame kills the process with SIGABRT); through
    EchoCanceller the same sizes are fine."""
    probe = textwrap.dedent("""
        import sys, numpy as np
        from livekit import rtc
        from appliance.devices.aec import EchoCanceller
        n = int(sys.argv[1])
        if sys.argv[2] == "raw":
            apm = rtc.AudioProcessingModule(echo_cancellation=True)
            apm.process_stream(rtc.AudioFrame(bytes(2 * n), 16000, 1, n))
        else:
            aec = EchoCanceller(echo_cancellation=True, noise_suppression=True)
            for _ in range(50):
                aec.far_end(np.ones(n, np.int16)); aec.near_end(np.ones(n, np.int16), 40)
        print("survived")
    """)
    raw = subprocess.run([sys.executable, "-c", probe, "100", "raw"], capture_output=True, text=True,
                         timeout=60)
    assert raw.returncode == -6, (raw.returncode, raw.stderr[-500:])  # SIGABRT
    sliced = subprocess.run([sys.executable, "-c", probe, "100", "sliced"], capture_output=True,
                            text=True, timeout=60)
    assert sliced.returncode == 0 and "survived" in sliced.stdout, sliced.stderr[-500:]


def test_echo_is_cancelled_and_the_visitor_kept() -> None:
    far, echo, noise = _scene()
    half = len(far) // 2
    results = {}
    for name, ns in (("aec", False), ("aec+ns", True)):
        aec = EchoCanceller(echo_cancellation=True, noise_suppression=ns)
        out = _run(aec, far, echo + noise, delay_ms=60)
        results[name] = (db(energy(echo[half:]), energy(out[half:])),
                         db(energy(echo[:3 * RATE]), energy(out[:3 * RATE])), aec)
        # then the visitor alone, on the same (converged) canceller, the speaker silent
        visitor = visitor_voice()
        alone = _run(aec, np.zeros(len(visitor)), visitor + noise[:len(visitor)], delay_ms=60)
        results[name] += (db(energy(visitor), energy(alone)),)
        # double talk: visitor and avatar together, the visitor's level compared with alone
        far2 = far[:len(visitor)]
        both = _run(aec, far2, visitor + echo[:len(visitor)] + noise[:len(visitor)], delay_ms=60)
        # the canceller's residual echo is small (ERLE above); what is left is mostly visitor
        results[name] += (db(energy(both), energy(alone)),)

    # without the far end it removes nothing: the test above can fail
    blind = EchoCanceller(echo_cancellation=True, noise_suppression=False)
    out = _run(blind, far, echo + noise, delay_ms=60, feed_far=False)
    blind_erle = db(energy(echo[half:]), energy(out[half:]))

    for name, (erle, early, aec, loss, double) in results.items():
        print(f"{name}: ERLE converged {erle:.1f} dB, first 3 s {early:.1f} dB, visitor alone loss "
              f"{loss:.2f} dB, double talk: visitor level {double:+.1f} dB vs alone, APM "
              f"{aec.stats()['cost_ms_per_frame']:.3f} ms per 10 ms frame")
    print(f"far end not fed: ERLE {blind_erle:.1f} dB")
    erle, early, _, loss, double = results["aec"]
    assert erle >= 30.0
    assert early >= 15.0
    assert abs(loss) <= 1.0
    assert double >= -6.0  # double talk: the visitor is still heard
    assert abs(results["aec+ns"][3]) <= 1.0  # noise suppression keeps the visitor too
    assert results["aec+ns"][0] >= 30.0
    assert blind_erle < 3.0


@pytest.mark.parametrize("ec,ns", [(False, False), (False, True)])
def test_without_echo_cancellation_no_delay_is_set(ec: bool, ns: bool) -> None:
    """set_stream_delay_ms "must be called if and only if echo processing is enabled"."""
    aec = EchoCanceller(echo_cancellation=ec, noise_suppression=ns)
    out = aec.near_end(np.zeros(321, np.int16), 80)
    assert len(out) == (320 if ns else 321) and aec.delay_ms == 0  # pass-through: unsliced
    assert aec.active is ns
