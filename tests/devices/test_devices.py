"""Devices: speaker and microphone through real PortAudio/ALSA, GPIO through gpiozero's MockFactory.

There is no sound card here, so each audio test writes its own ALSA
configuration and points ``ALSA_CONFIG_PATH`` at it alone (hermetic: no
system ``alsa.conf``, no ``~/.asoundrc``, no ``/etc/asound.conf``):

* the speaker is a ``file`` PCM over a ``null`` slave: what PortAudio plays
  lands, raw S16_LE at the negotiated rate and channels, in a file; with
  ``truncate false`` every open (PortAudio's probes too) starts a new file,
  ``speaker.raw``, ``speaker.raw.0001``, ...: concatenated they are all that played;
* the microphone is a ``file`` PCM with an ``infile``: capture returns that
  file's bytes (then, past its end, stale buffer contents: only the first
  ``len(infile)`` samples mean anything);
* ``pcm.default`` must exist: PortAudio 19.6 asserts in ``BuildDeviceList``
  when neither ``default`` nor ``dmix`` is defined.

Neither plugin blocks (their I/O returns at once), which is why the devices
pace themselves. alsa-lib reads its configuration once per process, so the
device code runs in a fresh interpreter per test (``HELPER`` below). No ALSA
plugin without hardware refuses a sample rate, so the fallback to a device's
own rate is tested by making PortAudio's capability probe refuse 16 kHz.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.config import AudioSection, GpioSection
from appliance.devices import Devices, LedState
from appliance.devices.gpio import Gpio

ROOT = Path(__file__).resolve().parents[2]

ASOUNDRC = """\
# PortAudio 19.6 asserts when no 'default' (or 'dmix') PCM is defined
pcm.default {{ type null }}
pcm.kiosk_speaker {{
    type file
    slave.pcm {{ type null }}
    file "{speaker_file}"
    format "raw"
    truncate false
}}
pcm.kiosk_mic {{
    type file
    slave.pcm {{ type null }}
    file "/dev/null"
    infile "{mic_file}"
    format "raw"
}}
"""

HELPER = r'''
import asyncio, json, logging, sys, time
import numpy as np
import pyaudio

scenario, args = sys.argv[1], json.loads(sys.argv[2])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")

probe = pyaudio.PyAudio.is_format_supported
def refuse(self, rate, *a, **kw):  # a device that only takes its own rate, or only stereo
    if args.get("refuse_16k") and rate == 16000:
        raise ValueError("Invalid sample rate")
    if args.get("refuse_mono") and 1 in (kw.get("output_channels"), kw.get("input_channels")):
        raise ValueError("Invalid number of channels")
    return probe(self, rate, *a, **kw)
pyaudio.PyAudio.is_format_supported = refuse

if args.get("fail_write"):  # the device vanishes once, on this write
    write, calls = pyaudio.PyAudio.Stream.write, [0]
    def flaky(self, *a, **kw):
        calls[0] += 1
        if calls[0] == args["fail_write"]:
            raise OSError(-9999, "Unanticipated host error")
        return write(self, *a, **kw)
    pyaudio.PyAudio.Stream.write = flaky

if args.get("fail_read"):  # the microphone is unplugged once, on this read
    read, reads = pyaudio.PyAudio.Stream.read, [0]
    def unplugged(self, *a, **kw):
        reads[0] += 1
        if reads[0] == args["fail_read"]:
            raise OSError(-9999, "Unanticipated host error")
        return read(self, *a, **kw)
    pyaudio.PyAudio.Stream.read = unplugged

if args.get("busy_input"):  # another program holds the input device: PortAudio's probe says so
    held = pyaudio.PyAudio.is_format_supported
    def busy(self, rate, *a, **kw):
        if kw.get("input_device") is not None:
            raise ValueError("Device unavailable")
        return held(self, rate, *a, **kw)
    pyaudio.PyAudio.is_format_supported = busy

from appliance.config import AudioSection, GpioSection
from appliance.devices import Devices

if args.get("kernel_cards"):  # what /proc/asound/cards says (this machine has no sound card)
    import appliance.devices.audio as audio_module
    audio_module._asound_cards = lambda: args["kernel_cards"]

async def main():
    loop = asyncio.get_running_loop()
    audio = AudioSection(speaker=args.get("speaker", ""), microphone=args.get("microphone", ""),
                         speaker_volume=args.get("volume", 1.0))
    devices = await asyncio.to_thread(Devices.open, audio, GpioSection(), loop)
    out = {"speaker": None, "microphone": None, "problems": devices.problems}
    if devices.speaker is not None:
        speaker = devices.speaker
        stream = speaker._stream
        out["speaker"] = {"rate": stream.rate, "channels": stream.channels}
        tone = args["amplitude"] * 32767 * np.sin(
            2 * np.pi * args["tone_hz"] * np.arange(int(16000 * args["seconds"])) / 16000)
        tone = tone.astype(np.int16)
        start = time.monotonic()
        for index, offset in enumerate(range(0, len(tone), 640)):  # 25 fps, like the frame pump
            speaker.play(tone[offset:offset + 640])
            await asyncio.sleep(max(0.0, start + (index + 1) * 0.04 - time.monotonic()))
        await asyncio.sleep(args.get("tail_s", 0.3))
        out["speaker"].update(speaker.stats())
    if devices.microphone is not None:
        frames = []
        async def collect():
            async for frame in devices.microphone:
                frames.append(frame)
                if len(frames) >= args["frames"]:
                    return
        await asyncio.wait_for(collect(), 10)
        first = frames[0]
        out["microphone"] = {"sample_rate": first.sample_rate, "channels": first.num_channels,
                             "samples_per_channel": first.samples_per_channel,
                             "rate": devices.microphone._stream.rate}
        samples = np.concatenate([np.frombuffer(f.data, np.int16) for f in frames])
        np.save(args["save"], samples)
        out["microphone"].update(devices.microphone.stats())
    devices.close()
    print(json.dumps(out))

asyncio.run(main())
'''


def _tone(rate: int, hz: float, seconds: float, amplitude: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    x = samples.astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def _loud(samples: np.ndarray, level: int = 1000) -> np.ndarray:
    """The samples from the first to the last one louder than ``level``."""
    where = np.flatnonzero(np.abs(samples.astype(np.int32)) > level)
    return samples[where[0]:where[-1] + 1] if len(where) else samples[:0]


@pytest.fixture
def alsa(tmp_path: Path) -> Iterator[Any]:
    """run(scenario, **args) -> (result, stderr) in a fresh interpreter on a private ALSA config."""
    speaker_file, mic_file = tmp_path / "speaker.raw", tmp_path / "mic.raw"
    asoundrc = tmp_path / "asoundrc"
    asoundrc.write_text(ASOUNDRC.format(speaker_file=speaker_file, mic_file=mic_file))
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    env = dict(os.environ, ALSA_CONFIG_PATH=str(asoundrc), JACK_NO_START_SERVER="1",
               PYTHONPATH=str(ROOT))

    class Run:
        mic = mic_file

        def played(self) -> np.ndarray:
            files = sorted(tmp_path.glob("speaker.raw*"))
            return np.concatenate([np.fromfile(f, np.int16) for f in files] or [np.zeros(0, np.int16)])

        def __call__(self, scenario: str, **args: Any) -> tuple[dict[str, Any], str]:
            args.setdefault("save", str(tmp_path / "mic.npy"))
            proc = subprocess.run([sys.executable, str(helper), scenario, json.dumps(args)],
                                  env=env, capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr

    yield Run()


# -- speaker -------------------------------------------------------------------------------


def test_speaker_plays_at_16k_with_volume(alsa: Any) -> None:
    result, log = alsa("speaker", speaker="kiosk_speaker", volume=0.5, tone_hz=440,
                       amplitude=0.6, seconds=0.8)
    assert result["speaker"]["rate"] == 16000 and result["speaker"]["channels"] == 1
    played = alsa.played()
    tone = _loud(played)
    assert abs(len(tone) - 0.8 * 16000) < 0.02 * 16000  # all of it, nothing dropped
    assert abs(_peak_hz(tone, 16000) - 440) < 3
    expected_rms = 0.6 * 0.5 * 32767 / np.sqrt(2)
    assert abs(tone.astype(np.float64).std() - expected_rms) < 0.03 * expected_rms
    assert result["speaker"]["dropped_s"] == 0
    assert "ERROR" not in log and "Traceback" not in log


def test_speaker_resamples_to_the_device_rate_and_clips(alsa: Any) -> None:
    result, log = alsa("speaker", speaker="SPEAKER", volume=2.0, tone_hz=440, amplitude=0.9,
                       seconds=0.6, refuse_16k=True, refuse_mono=True)
    rate = result["speaker"]["rate"]
    assert rate == 44100  # the device's own rate, as PortAudio reports it for ALSA plugins
    assert result["speaker"]["channels"] == 2
    assert "'kiosk_speaker' at 44100 Hz, 2 channel(s)" in log  # matched by part of its name
    stereo = alsa.played().reshape(-1, 2)
    assert np.array_equal(stereo[:, 0], stereo[:, 1])
    tone = _loud(stereo[:, 0])
    assert abs(len(tone) - 0.6 * rate) < 0.03 * rate
    assert abs(_peak_hz(tone, rate) - 440) < 3
    # 0.9 × 2.0 clips at full scale instead of wrapping around
    assert tone.max() == 32767 and tone.min() == -32768
    middle = tone[len(tone) // 4: 3 * len(tone) // 4].astype(np.int32)
    assert np.max(np.abs(np.diff(middle))) < 32767  # no jump from +full scale to -full scale


def test_speaker_reopens_a_device_that_vanished(alsa: Any) -> None:
    result, log = alsa("speaker", speaker="kiosk_speaker", tone_hz=440, amplitude=0.5,
                       seconds=1.6, fail_write=20, tail_s=0.3)
    assert result["speaker"]["reopened"] == 1 and not result["speaker"]["lost"]
    assert log.count("stopped working") == 1
    assert log.count("is back after") == 1
    played = alsa.played()
    before = 19 * 320  # writes before the failure, 20 ms each
    assert len(_loud(played[before:])) > 0.3 * 16000  # it plays again after the reopen


def test_missing_devices_are_one_clear_line_each(alsa: Any) -> None:
    result, log = alsa("missing", speaker="USB Audio", microphone="ReSpeaker")
    assert result["speaker"] is None and result["microphone"] is None
    errors = [line for line in log.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2
    assert errors[0].startswith("ERROR [audio] speaker: no output device matching 'USB Audio'")
    assert "'kiosk_speaker'" in errors[0] and "set speaker to one of these names" in errors[0]
    assert errors[1].startswith("ERROR [audio] microphone: no input device matching 'ReSpeaker'")
    assert result["problems"] == [e.removeprefix("ERROR ") for e in errors]
    assert "Traceback" not in log


# -- microphone ----------------------------------------------------------------------------


def test_microphone_yields_20ms_frames_of_the_input(alsa: Any) -> None:
    source = _tone(16000, 1000, 1.0, 0.5)
    source.tofile(alsa.mic)
    result, log = alsa("mic", microphone="kiosk_mic", frames=40)  # 0.8 s
    mic = result["microphone"]
    assert (mic["sample_rate"], mic["channels"], mic["samples_per_channel"], mic["rate"]) == (
        16000, 1, 320, 16000)
    captured = np.load(alsa.mic.with_name("mic.npy"))
    assert np.array_equal(captured, source[:len(captured)])  # bit-exact at the device's rate


def test_microphone_resamples_from_the_device_rate(alsa: Any) -> None:
    source = _tone(44100, 1000, 1.0, 0.5)
    np.repeat(source, 2).tofile(alsa.mic)  # a stereo-only device: the same tone left and right
    result, log = alsa("mic", microphone="mic", frames=40, refuse_16k=True, refuse_mono=True)
    mic = result["microphone"]
    assert mic["rate"] == 44100 and mic["sample_rate"] == 16000 and mic["samples_per_channel"] == 320
    assert mic["channels"] == 1 and "'kiosk_mic' at 44100 Hz, 2 channel(s)" in log
    captured = np.load(alsa.mic.with_name("mic.npy"))[320:]  # skip the filter's first samples
    assert abs(_peak_hz(captured, 16000) - 1000) < 3
    expected_rms = 0.5 * 32767 / np.sqrt(2)
    assert abs(captured.astype(np.float64).std() - expected_rms) < 0.03 * expected_rms


def test_an_unplugged_microphone_is_reopened_and_frames_flow_again(alsa: Any) -> None:
    source = _tone(16000, 1000, 2.0, 0.5)
    source.tofile(alsa.mic)
    result, log = alsa("mic", microphone="kiosk_mic", frames=60, fail_read=10)  # 1.2 s
    mic = result["microphone"]
    assert mic["reopened"] == 1 and not mic["lost"], mic
    lost = [line for line in log.splitlines() if "stopped working" in line]
    assert len(lost) == 1 and lost[0].startswith("WARNING [audio] microphone: 'kiosk_mic'"), log
    assert "check its cable" in lost[0]
    assert log.count("is back after") == 1
    # the reopened device reads its infile from the start again: 20 ms frames keep coming
    assert len(np.load(alsa.mic.with_name("mic.npy"))) == 60 * 320


def test_a_busy_microphone_is_one_line_with_the_fix(alsa: Any) -> None:
    _tone(16000, 1000, 0.5, 0.5).tofile(alsa.mic)
    result, log = alsa("busy", speaker="kiosk_speaker", microphone="kiosk_mic", busy_input=True,
                       amplitude=0.5, tone_hz=440, seconds=0.2)
    assert result["microphone"] is None and result["speaker"] is not None  # the speaker still plays
    errors = [line for line in log.splitlines() if line.startswith("ERROR")]
    assert errors == ["ERROR [audio] microphone: 'kiosk_mic' is busy (Device unavailable)"
                      " — stop the other program using it (fuser -v /dev/snd/*)"], log


def test_a_card_portaudio_could_not_open_is_called_busy_not_missing(alsa: Any) -> None:
    # PortAudio leaves out of its list any device it cannot open while enumerating (a card
    # another program holds; here: a file PCM whose infile does not exist), so only the
    # kernel's card list tells "busy" from "not plugged in"
    cards = (" 0 [PCH            ]: HDA-Intel - HDA Intel PCH\n"
             "                      HDA Intel PCH at 0xf7f10000 irq 32\n"
             " 1 [kiosk_mic      ]: USB-Audio - kiosk_mic USB\n")
    result, log = alsa("busy", microphone="kiosk_mic", kernel_cards=cards)
    assert result["microphone"] is None
    errors = [line for line in log.splitlines() if line.startswith("ERROR")]
    assert errors == ["ERROR [audio] microphone: 'kiosk_mic' is sound card 1 (USB-Audio - kiosk_mic"
                      " USB) but cannot be opened as an input: probably busy — stop the other"
                      " program using it (fuser -v /dev/snd/*)"], log


# -- GPIO ----------------------------------------------------------------------------------


@pytest.fixture
def mock_pins() -> Iterator[Any]:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    previous = Device.pin_factory
    factory = MockFactory()
    Device.pin_factory = factory
    try:
        yield factory
    finally:
        factory.reset()
        Device.pin_factory = previous


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_gpio_events_reach_asyncio(mock_pins: Any) -> None:
    loop = asyncio.get_running_loop()
    events: list[tuple[str, bool]] = []
    devices = Devices.open(
        AudioSection(), GpioSection(motion_pin="GPIO17", button_pin="BOARD13", led_pin="22"), loop,
        on_motion=lambda on: events.append(("motion", on)),
        on_button=lambda on: events.append(("button", on)),
    )
    try:
        assert devices.problems == [] and devices.speaker is None and devices.microphone is None
        motion, button = mock_pins.pin(17), mock_pins.pin(27)  # BOARD13 is GPIO27
        motion.drive_high()
        motion.drive_low()
        button.drive_low()  # pulled up: pressed pulls it low
        button.drive_high()
        assert events == []  # delivered by the loop, never on gpiozero's thread
        await _settle()
        assert events == [("motion", True), ("motion", False), ("button", True), ("button", False)]
    finally:
        devices.close()


async def test_led_states(mock_pins: Any) -> None:
    loop = asyncio.get_running_loop()
    gpio = Gpio.open(GpioSection(led_pin="GPIO22"), loop, blink_s=0.02)
    led = mock_pins.pin(22)
    try:
        assert gpio.problems == [] and led.state is False
        gpio.set_led(LedState.ON)
        assert led.state is True
        led.clear_states()
        gpio.set_led(LedState.BLINK)
        await asyncio.sleep(0.2)
        changes = [s.state for s in led.states]
        assert changes.count(True) >= 2 and changes.count(False) >= 2  # it blinks
        gpio.set_led(LedState.OFF)
        await asyncio.sleep(0.05)
        assert led.state is False
        gpio.set_led(LedState.ON)
        assert led.state is True
    finally:
        gpio.close()


async def test_invalid_pins_are_reported_and_the_rest_works(
    mock_pins: Any, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    events: list[bool] = []
    with caplog.at_level(logging.ERROR, logger="appliance.devices"):
        gpio = Gpio.open(GpioSection(motion_pin="GPIO99", button_pin="GPIO27", led_pin="bogus"),
                         loop, on_button=events.append)
    try:
        assert len(gpio.problems) == 2
        assert gpio.problems[0].startswith("[gpio] motion_pin: 'GPIO99' is not a pin on this board")
        assert gpio.problems[1].startswith("[gpio] led_pin: 'bogus' is not a pin on this board")
        assert all('"GPIO17"' in p for p in gpio.problems)  # the fix shows a valid name
        assert [r.getMessage() for r in caplog.records] == gpio.problems
        gpio.set_led(LedState.BLINK)  # no LED: nothing happens
        mock_pins.pin(27).drive_low()
        await _settle()
        assert events == [True]
    finally:
        gpio.close()


async def test_no_gpio_on_this_machine_is_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import gpiozero

    def no_factory() -> None:
        raise gpiozero.BadPinFactory("Unable to load any default pin factory!")

    monkeypatch.setattr(gpiozero.Device, "pin_factory", None)
    monkeypatch.setattr(gpiozero.Device, "_default_pin_factory", staticmethod(no_factory))
    with caplog.at_level(logging.ERROR, logger="appliance.devices"):
        devices = Devices.open(AudioSection(), GpioSection(motion_pin="GPIO17", led_pin="GPIO22"),
                               asyncio.get_running_loop())
    devices.set_led(LedState.ON)
    devices.close()
    assert devices.problems == [
        "[gpio] motion_pin, led_pin: no GPIO on this machine (Unable to load any default pin"
        " factory!) — leave the [gpio] pins empty here; on a Raspberry Pi 5 install lgpio"
    ]
    assert len(caplog.records) == 1
