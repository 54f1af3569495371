"""Config schema, layers, errors and secrets (the core issue's minimal config)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import (
    ConfigError,
    load_config,
    parse_layers,
    render_default_toml,
)

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_shipped_default_file_matches_schema() -> None:
    assert (ROOT / "config" / "appliance.toml").read_text() == render_default_toml(), (
        "config/appliance.toml drifted from the schema: run `make config`"
    )


def test_default_file_uncommented_is_valid_and_equal_to_defaults() -> None:
    text = re.sub(r"(?m)^# ([a-z_]+ = )", r"\1", render_default_toml())
    config = parse_layers([("appliance.toml", text)])
    defaults = parse_layers([])
    assert (config.livekit, config.avatar) == (defaults.livekit, defaults.avatar)


def test_minimal_config(tmp_path: Path) -> None:
    secret = write(tmp_path / "lk.secret", "s3cr3t-value\n", 0o600)
    path = write(
        tmp_path / "a.toml",
        f"""
[livekit]
url = "ws://10.0.0.1:7880"
room = "hall"
identity = "kiosk-hall"
api_key = "key1"
api_secret_file = "{secret}"
[avatar]
runtime = "reference"
""",
    )
    config = load_config([path])
    assert config.livekit.room == "hall"
    assert config.secret("livekit.api_secret").reveal() == "s3cr3t-value"
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in str(config.secrets)
    assert config.origins["livekit.room"] == str(path)


def test_layers_override_in_order(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", '[livekit]\nroom = "a"\nidentity = "x"\n')
    b = write(tmp_path / "b.toml", '[livekit]\nroom = "b"\n')
    config = load_config([a, b])
    assert (config.livekit.room, config.livekit.identity) == ("b", "x")
    assert config.origins["livekit.room"] == str(b)


def test_all_problems_reported_at_once_with_file_line_and_fix(tmp_path: Path) -> None:
    path = write(
        tmp_path / "bad.toml",
        """
[livekit]
rom = "typo"
token_ttl_s = 5
simulcast = "yes"
[avatar]
runtime = "bithumen"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config([path])
    lines = [str(p) for p in info.value.problems]
    assert len(lines) == 4, lines
    assert f"{path}:3: [livekit] rom: unknown key — did you mean `room`?" in lines
    assert any(f"{path}:4: [livekit] token_ttl_s: got 5, out of range" in line for line in lines)
    assert any(
        f"{path}:5: [livekit] simulcast: got 'yes', expected true or false" in line
        for line in lines
    )
    assert any("did you mean 'bithuman'" in line for line in lines)


def test_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.toml", "[livekit]\nroom = lobby\n")
    with pytest.raises(ConfigError) as info:
        load_config([path])
    assert str(info.value).startswith(f"{path}:2:")
    assert "TOML syntax error" in str(info.value)


def test_secret_readable_by_others_is_refused_with_chmod(tmp_path: Path) -> None:
    secret = write(tmp_path / "lk.secret", "value", 0o644)
    path = write(tmp_path / "a.toml", f'[livekit]\napi_key = "k"\napi_secret_file = "{secret}"\n')
    with pytest.raises(ConfigError) as info:
        load_config([path])
    assert f"`chmod 600 {secret}`" in str(info.value)
    assert "value" not in str(info.value).replace("mode", "")


def test_missing_secret_file_names_setting(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.toml", '[livekit]\napi_key = "k"\napi_secret_file = "/nonexistent/s"\n'
    )
    with pytest.raises(
        ConfigError, match=r"\[livekit\] api_secret_file: secret file /nonexistent/s does not exist"
    ):
        load_config([path])


def test_systemd_credential_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds / "livekit-secret", "from-systemd", 0o640)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = parse_layers(
        [("x.toml", '[livekit]\napi_key = "k"\napi_secret_file = "livekit-secret"\n')]
    )
    assert config.secret("livekit.api_secret").reveal() == "from-systemd"


def test_check_command_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path / "good.toml", '[livekit]\nroom = "lobby"\n')
    bad = write(tmp_path / "bad.toml", "[livekit]\nroom = 3\n")
    env = dict(os.environ)
    run = [sys.executable, "-m", "appliance", "check", "--config"]
    ok = subprocess.run(run + [str(good)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    failed = subprocess.run(run + [str(bad)], capture_output=True, text=True, env=env)
    assert failed.returncode == 3
    assert f"{bad}:2: [livekit] room: got 3, expected a string" in failed.stderr


# -- the corpus of broken configs: every one is refused with file, line or key, and a fix --

BROKEN = sorted((ROOT / "tests" / "config" / "configs" / "broken").glob("*.toml"))
EXPECTED = {
    "bad-choice.toml": ":2: [avatar] runtime: got 'bithumann' — did you mean 'bithuman'?",
    "bad-ladder.toml": ":2: [fallback] gpu_api_url: the ladder has gpu but no gpu_api_url",
    "gpu-portrait-missing.toml": ":4: [fallback] gpu_avatar_image: cannot read /nonexistent/portrait.jpg",
    "bad-url.toml": ":2: [livekit] url: got 'http://livekit.example.com' — use ws://",
    "bad-window.toml": ":4: [models] update_window: got '2am-5am'",
    "bithuman-without-model.toml": ":2: [avatar] model: runtime is bithuman but no model is set",
    # saved by Notepad with a byte order mark and CRLF: read as written, lines counted right
    "bom-crlf-wrong-type.toml": ":4: [avatar] stall_timeout_s: got 'two', expected a number",
    "inline-secret.toml": ":3: [livekit] api_secret: unknown key — secrets are never written in the TOML",
    "latin1.toml": ":3: [livekit] room: not UTF-8: byte 0xe9 ('é' in Windows-1252/Latin-1) at column 12"
                   " — save the file as UTF-8",
    "out-of-range.toml": ":2: [livekit] token_ttl_s: got 10, out of range — use a value from 60 to 86400",
    "several-problems.toml": ":3: [livekit] identty: unknown key — did you mean `identity`?",
    "smart-quotes.toml": ':3: [livekit] room: curly quote “ at column 8: TOML needs straight quotes'
                         ' — replace the curly quotes “ ” with straight quotes "',
    "smart-single-quotes.toml": ":2: [avatar] model: curly quote ‘ at column 9: TOML needs straight quotes"
                                " — replace the curly quotes ‘ ’ with straight quotes '",
    "syntax-missing-bracket.toml": ":1: TOML syntax error",
    "syntax-unquoted-string.toml": ":2: TOML syntax error",
    "unknown-key-typo.toml": ":2: [livekit] rooom: unknown key — did you mean `room`?",
    "unknown-section.toml": ":1: [avatr]: unknown section — did you mean [avatar]?",
    "utf16.toml": ':1: the file is UTF-16 (Notepad\'s "Unicode"), not UTF-8 — save the file as UTF-8',
    "wrong-type.toml": ":2: [avatar] stall_timeout_s: got 'two', expected a number",
}


def test_corpus_is_covered() -> None:
    assert {p.name for p in BROKEN} == set(EXPECTED)


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.name)
def test_broken_config_is_explained(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([path])
    lines = [str(p) for p in info.value.problems]
    assert any(line.startswith(f"{path}{EXPECTED[path.name]}") for line in lines), lines
    for problem in info.value.problems:
        assert problem.path == str(path)
        assert problem.line or problem.key, problem
        assert problem.fix, f"no fix offered: {problem}"
    assert "do-not-put-secrets-here" not in "\n".join(lines)


def test_check_command_on_the_corpus_directory() -> None:
    result = subprocess.run([sys.executable, "-m", "appliance", "check", str(BROKEN[0].parent)],
                            capture_output=True, text=True)
    assert result.returncode == 3
    for path in BROKEN:
        assert str(path) in result.stdout, path
    assert f"0 of {len(BROKEN)} file(s) valid" in result.stdout
