"""Configs saved by Windows and macOS editors, through every reader of operator TOML.

Notepad writes a byte order mark, CRLF line ends, or (as "ANSI") Windows-1252 bytes;
TextEdit turns typed quotes into curly ones. The /etc layers, appliance.d drop-ins, the
boot-partition import, `appliance check` and a live reload all decode through
``config.decode_toml``: a BOM and CRLF are read as written, the rest is one line with the
file, the line, the character and the fix, and the kiosk keeps its last good config.
(The refusal messages themselves are the corpus in tests/config/configs/broken/, see test_config.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config
from appliance.config import boot as bootconfig
from appliance.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]
BROKEN = ROOT / "tests" / "config" / "configs" / "broken"
BOM = b"\xef\xbb\xbf"
LATIN1 = b'[livekit]\nroom = "caf\xe9"\n'
CURLY = '[livekit]\nroom = “lobby”\nidentity = “kiosk”\n[avatar]\nmodel = ‘/tmp/x.json’\n'.encode()


def problems_of(paths: list[Path]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(paths)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("raw", [
    '[livekit]\r\nroom = "café"\r\n'.encode(),          # Notepad, CRLF
    BOM + '[livekit]\nroom = "café"\n'.encode(),         # Notepad, UTF-8 with BOM
    BOM + '[livekit]\r\nroom = "café"\r\n'.encode(),     # both
    '[livekit]\nroom = "café" # a “nice” room\n'.encode(),  # curly quotes in a comment are fine
], ids=["crlf", "bom", "bom-crlf", "curly-in-comment"])
def test_windows_and_mac_saves_load(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "appliance.toml"
    path.write_bytes(raw)
    assert load_config([path]).livekit.room == "café"


def test_curly_quotes_inside_a_string_are_a_value_not_a_mistake(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_bytes('[livekit]\nroom = "the “blue” hall"\n'.encode())
    assert load_config([path]).livekit.room == "the “blue” hall"


def test_every_curly_quoted_line_is_named_at_once(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_bytes(CURLY)
    lines = problems_of([path])
    assert [line.split(" curly")[0] for line in lines] == [
        f"{path}:2: [livekit] room:", f"{path}:3: [livekit] identity:", f"{path}:5: [avatar] model:"]
    assert 'with straight quotes "' in lines[0] and "with straight quotes '" in lines[2]


def test_another_syntax_error_is_not_blamed_on_curly_quotes(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_bytes('[livekit\nroom = “lobby”\n'.encode())
    assert problems_of([path]) == [
        f"{path}:1: TOML syntax error: Expected ']' at the end of a table declaration (at line 1, "
        "column 9) — fix the line (strings need quotes, tables need [brackets])"]


def test_a_bad_layer_does_not_hide_the_problems_of_the_others(tmp_path: Path) -> None:
    etc, dropin = tmp_path / "appliance.toml", tmp_path / "10-room.toml"
    etc.write_text('[avatar]\nstall_timeout_s = "two"\n')
    dropin.write_bytes(LATIN1)
    lines = problems_of([etc, dropin])
    assert any(line.startswith(f"{dropin}:2: [livekit] room: not UTF-8: byte 0xe9") for line in lines), lines
    assert any(line.startswith(f"{etc}:2: [avatar] stall_timeout_s: got 'two'") for line in lines), lines


# -- appliance check FILE -------------------------------------------------------------------


def test_check_names_the_line_and_the_fix_without_a_traceback(tmp_path: Path) -> None:
    good = tmp_path / "notepad.toml"
    good.write_bytes(BOM + b'[livekit]\r\nroom = "lobby"\r\n')
    files = [good, BROKEN / "latin1.toml", BROKEN / "smart-quotes.toml", BROKEN / "utf16.toml"]
    done = subprocess.run([sys.executable, "-m", "appliance", "check", *map(str, files)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 3
    assert f"ok: {good}" in done.stdout
    assert f"{BROKEN / 'latin1.toml'}:3: [livekit] room: not UTF-8" in done.stdout
    assert f"{BROKEN / 'smart-quotes.toml'}:3: [livekit] room: curly quote “" in done.stdout
    assert "1 of 4 file(s) valid" in done.stdout
    assert "Traceback" not in done.stderr + done.stdout and "UnicodeDecodeError" not in done.stderr


# -- the boot-partition import --------------------------------------------------------------


def _import(tmp_path: Path, boot_bytes: bytes, etc_bytes: bytes | None = None) -> bootconfig.ImportResult:
    boot, etc = tmp_path / "boot.toml", tmp_path / "etc.toml"
    boot.write_bytes(boot_bytes)
    if etc_bytes is not None:
        etc.write_bytes(etc_bytes)
    return bootconfig.import_boot_config(boot, etc, tmp_path / "no-dropins", tmp_path / "boot-config.toml")


def test_a_secret_file_saved_by_notepad_holds_only_the_secret(tmp_path: Path) -> None:
    secret = tmp_path / "livekit-secret"
    secret.write_bytes(b"\xef\xbb\xbfthe-secret-0123456789\r\n")  # BOM and CRLF
    secret.chmod(0o600)
    conf = tmp_path / "appliance.toml"
    conf.write_text(f'[livekit]\napi_key = "k"\napi_secret_file = "{secret}"\n')
    value = load_config([conf]).secret("livekit.api_secret")
    assert value is not None and value.reveal() == "the-secret-0123456789"


def test_boot_import_of_a_notepad_file_is_normalised(tmp_path: Path) -> None:
    result = _import(tmp_path, BOM + '[livekit]\r\nroom = "café"\r\n'.encode())
    assert result.imported, result
    assert (tmp_path / "boot-config.toml").read_bytes() == '[livekit]\nroom = "café"\n'.encode()
    assert load_config([tmp_path / "boot-config.toml"]).livekit.room == "café"


@pytest.mark.parametrize("raw,expected", [
    (LATIN1, ":2: [livekit] room: not UTF-8: byte 0xe9 ('é' in Windows-1252/Latin-1) at column 12"),
    (CURLY, ':2: [livekit] room: curly quote “ at column 8: TOML needs straight quotes'),
], ids=["latin1", "curly"])
def test_boot_import_refuses_with_the_line_and_keeps_the_previous(tmp_path: Path, raw: bytes,
                                                                  expected: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    previous = tmp_path / "boot-config.toml"
    previous.write_text('[livekit]\nroom = "previous"\n')
    boot = tmp_path / "boot.toml"
    boot.write_bytes(raw)
    code = bootconfig.main(["--boot", str(boot), "--etc", str(tmp_path / "etc.toml"),
                            "--dropins", str(tmp_path / "none"), "--dest", str(previous)])
    err = capsys.readouterr().err
    assert code == 3
    assert f"{boot}{expected}" in err and " — " in err, err
    assert "Traceback" not in err and "UnicodeDecodeError" not in err
    assert previous.read_text() == '[livekit]\nroom = "previous"\n'


def test_boot_import_is_not_refused_for_an_undecodable_etc_layer(tmp_path: Path) -> None:
    # the /etc layer is the daemon's to report; the boot file itself is fine
    result = _import(tmp_path, b'[livekit]\nroom = "from-boot"\n', etc_bytes=LATIN1)
    assert result.imported and not result.problems, result


# -- a live kiosk keeps its last good config ------------------------------------------------


def write(path: Path, raw: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, path)


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[tuple[Supervisor, Path]]:
    path = tmp_path / "appliance.toml"
    write(path, f'[livekit]\nroom = "lobby"\n[status]\nsocket = "{tmp_path}/s.sock"\n'.encode())
    sup = Supervisor(load_config([path]), load=lambda: load_config([path]))
    await sup.start()
    try:
        yield sup, path
    finally:
        await sup.close()


async def test_reload_keeps_the_last_good_config_and_says_why(supervisor: tuple[Supervisor, Path]) -> None:
    sup, path = supervisor
    before, pid = sup.config, sup.renderer.pid if sup.renderer else None
    socket = f'[status]\nsocket = "{path.parent}/s.sock"\n'.encode()
    for raw, expected in [
        (b'[livekit]\nroom = "h\xf4tel"\n' + socket, f"{path}:2: [livekit] room: not UTF-8: byte 0xf4"),
        ('[livekit]\nroom = “hall”\n'.encode() + socket, f"{path}:2: [livekit] room: curly quote “"),
    ]:
        write(path, raw)
        assert await sup.reload("edited") is False
        assert sup.config is before
        assert len(sup.config_problems) == 1 and sup.config_problems[0].startswith(expected)
        assert "save the file as UTF-8" in sup.config_problems[0] or "straight quotes" in sup.config_problems[0]
        assert sup.status()["config_problems"] == sup.config_problems
        assert sup.renderer is not None and sup.renderer.pid == pid and sup.frames_flowing(2.0)
    # the same edit saved again by Notepad (BOM, CRLF) applies
    write(path, BOM + ('[livekit]\r\nroom = "hôtel"\r\n[status]\r\n'
                       f'socket = "{path.parent}/s.sock"\r\n').encode())
    assert await sup.reload("fixed") is True
    assert sup.config.livekit.room == "hôtel" and sup.config_problems == []
