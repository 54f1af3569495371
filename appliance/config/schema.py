"""The appliance's configuration: one schema, TOML layers, one frozen Config.

Every setting is declared exactly once, as a field of a section dataclass
below with ``setting(...)``: its type, default, unit (in the name: ``_s``,
``_ms``, ``_mb``), range and help. Validation, ``config/appliance.toml``,
the README table and ``appliance config show`` are all derived from these
declarations (``tests/test_config.py`` proves they agree).

Errors are collected, never raised one by one: a file with three mistakes
gets three lines, each ``path:line: [section] key: what is wrong — fix``.
Secrets are never inline: ``*_file`` keys name a file (mode 0600) or a
systemd credential, and the value is held in a ``Secret`` that never prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import text as config_text

__all__ = [
    "Config",
    "ConfigError",
    "Problem",
    "Secret",
    "SECTIONS",
    "decode_toml",
    "load_config",
    "iter_settings",
    "restart_only_keys",
]


class Secret:
    """A secret value that never appears in repr, str, logs or exceptions."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source  # where it came from (a path), safe to show

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<redacted> from {self.source})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    reload: bool = True,
    secret_file: bool = False,
) -> Any:
    """Declare one setting (a dataclass field with its documentation)."""
    meta = {
        "help": help,
        "choices": choices,
        "min": min,
        "max": max,
        "reload": reload,
        "secret_file": secret_file,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class LiveKitSection:
    url: str = setting("ws://127.0.0.1:7880", "LiveKit server URL (ws:// or wss://)")
    room: str = setting("lobby", "room the kiosk joins")
    identity: str = setting("kiosk", "the kiosk's participant identity in the room")
    api_key: str = setting("", "API key for minting tokens locally (leave empty to use token_url)")
    api_secret_file: str = setting(
        "", "file holding the API secret (mode 0600), or a systemd credential name", secret_file=True
    )
    token_url: str = setting(
        "", "URL that returns a join token (JSON {\"token\": ...}) instead of api_key/api_secret"
    )
    token_ttl_s: int = setting(3600, "lifetime of locally minted tokens", min=60, max=86400)
    simulcast: bool = setting(
        False, "publish simulcast layers (needs a server with RID support, e.g. livekit-server)"
    )
    max_bitrate_kbps: int = setting(1500, "video bitrate cap", min=100, max=20000)
    connect_timeout_s: float = setting(10.0, "give up one connection attempt after this", min=1, max=120)
    retry_max_s: float = setting(10.0, "longest wait between reconnection attempts", min=1, max=600)


@dataclass(frozen=True)
class AvatarSection:
    runtime: str = setting(
        "reference", "what renders the avatar", choices=("reference", "bithuman")
    )
    model: str = setting(
        "", "model file (.imx for bithuman, .json for reference); empty = the bundled reference avatar"
    )
    api_secret_file: str = setting(
        "", "file holding the bitHuman API secret (mode 0600)", secret_file=True
    )
    width: int = setting(512, "video width in pixels (reference runtime)", min=64, max=1920, reload=False)
    height: int = setting(512, "video height in pixels (reference runtime)", min=64, max=1920, reload=False)
    stall_timeout_s: float = setting(
        2.0, "restart the renderer when no frame arrived for this long", min=0.5, max=120
    )


@dataclass(frozen=True)
class ModelsSection:
    directory: str = setting(
        "/var/lib/appliance/models", "where staged, current and previous models live", reload=False
    )
    manifest_url: str = setting(
        "", "signed update manifest: https:// URL, or a file path for USB/offline installs; empty = no updates"
    )
    public_key: str = setting(
        "", "ed25519 public key (base64) that must have signed the manifest"
    )
    check_interval_s: int = setting(3600, "how often to look for a new model", min=60, max=604800)
    update_window: str = setting(
        "", "local time window for switching models, e.g. \"02:00-05:00\"; empty = any time"
    )
    only_when_idle: bool = setting(True, "switch models only while the avatar is not speaking")
    keep_previous: int = setting(1, "how many previous models to keep for rollback", min=1, max=10)
    warmup_timeout_s: float = setting(
        120.0, "a new model must render healthy frames within this time, or it is marked bad", min=5, max=900
    )
    min_free_mb: int = setting(64, "space to leave free on the models' filesystem after a download",
                               min=0, max=100000)


@dataclass(frozen=True)
class FallbackSection:
    ladder: tuple[str, ...] = setting(
        ("local",), "backends to try in order when the one before cannot serve",
        choices=("local", "gpu", "cloud"),
    )
    gpu_api_url: str = setting("", "self-hosted bitHuman GPU container endpoint (https://...)")
    gpu_api_secret_file: str = setting(
        "", "file holding the GPU endpoint's secret (mode 0600)", secret_file=True
    )
    cloud_avatar_id: str = setting("", "bitHuman cloud avatar id for the cloud backend")
    unhealthy_after_s: float = setting(
        10.0, "hand over when the local runtime produced no frame for this long", min=1, max=600
    )
    recover_after_s: float = setting(
        60.0, "take the avatar back once the local runtime has been healthy this long", min=5, max=3600
    )


@dataclass(frozen=True)
class AudioSection:
    speaker: str = setting("", "play the avatar's voice on this output device (name); empty = off")
    microphone: str = setting("", "publish this input device (name) in the room; empty = off")
    speaker_volume: float = setting(1.0, "local speaker gain", min=0.0, max=2.0)


@dataclass(frozen=True)
class GpioSection:
    motion_pin: str = setting("", "motion sensor input, e.g. \"GPIO17\"; empty = none")
    button_pin: str = setting("", "push button input, e.g. \"GPIO27\"; empty = none")
    led_pin: str = setting("", "status LED output, e.g. \"GPIO22\"; empty = none")


@dataclass(frozen=True)
class StatusSection:
    socket: str = setting(
        "/run/appliance/status.sock", "unix socket that `appliance status` reads", reload=False
    )
    http_port: int = setting(
        0, "serve /healthz and /metrics on 127.0.0.1 at this port; 0 = off", min=0, max=65535, reload=False
    )


@dataclass(frozen=True)
class LoggingSection:
    level: str = setting("info", "log level of the appliance", choices=("debug", "info", "warning", "error"))
    sdk_level: str = setting(
        "warning", "log level of the LiveKit and WebRTC libraries", choices=("debug", "info", "warning", "error")
    )


SECTIONS: dict[str, type] = {
    "livekit": LiveKitSection,
    "avatar": AvatarSection,
    "models": ModelsSection,
    "fallback": FallbackSection,
    "audio": AudioSection,
    "gpio": GpioSection,
    "status": StatusSection,
    "logging": LoggingSection,
}


@dataclass(frozen=True)
class Config:
    livekit: LiveKitSection = field(default_factory=LiveKitSection)
    avatar: AvatarSection = field(default_factory=AvatarSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    fallback: FallbackSection = field(default_factory=FallbackSection)
    audio: AudioSection = field(default_factory=AudioSection)
    gpio: GpioSection = field(default_factory=GpioSection)
    status: StatusSection = field(default_factory=StatusSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    # secrets read from *_file settings, keyed "section.key" (without _file)
    secrets: Mapping[str, Secret] = field(default_factory=dict)
    # "section.key" -> where the value came from (a file path or "default")
    origins: Mapping[str, str] = field(default_factory=dict)

    def secret(self, name: str) -> Secret | None:
        return self.secrets.get(name)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration, phrased for an operator."""

    path: str
    line: int | None
    key: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        fix = f" — {self.fix}" if self.fix else ""
        return f"{self.located()}{fix}"

    def located(self) -> str:
        """``file:line: [section] key: what is wrong``, without the fix."""
        where = f"{self.path}:{self.line}" if self.line else self.path
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"

    def report(self) -> tuple[str, str, str, str]:
        """(subject, message, setting, fix) for the problem registry."""
        where = f"{self.path}:{self.line}" if self.line else self.path
        return (f"{where} {self.key}".strip(), self.located(), self.key, self.fix)


class ConfigError(Exception):
    """The configuration cannot be used as written; ``problems`` lists every reason.

    ``usable`` is set when the only problems are unreadable secrets: the rest of
    the config is valid, so the kiosk can still render (and say why it cannot join).
    """

    def __init__(self, problems: list[Problem], usable: Config | None = None) -> None:
        self.problems = problems
        self.usable = usable
        super().__init__("\n".join(str(p) for p in problems))


def iter_settings() -> Iterable[tuple[str, dataclasses.Field[Any]]]:
    """(section name, field) for every declared setting, in declaration order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f


def restart_only_keys() -> frozenset[str]:
    """``section.key`` of every setting declared ``reload=False``: they apply at the next start."""
    return frozenset(f"{section}.{f.name}" for section, f in iter_settings() if not f.metadata["reload"])


_TYPES: dict[str, type] = {
    "str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": tuple,
}


def _type_name(t: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        t, str(t)
    )


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """Best-effort line number of [section] / key in a TOML text (tomllib gives none)."""
    lines = text.splitlines()
    in_section = False
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([^\]]+?)\s*\]", stripped)
        if header:
            in_section = header.group(1) == section
            if in_section and key is None:
                return number
            continue
        if in_section and key is not None and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return number
    return None


def _check_value(
    section: str, f: dataclasses.Field[Any], value: Any, path: str, text: str
) -> tuple[Any, Problem | None]:
    key = f"[{section}] {f.name}"
    line = _line_of(text, section, f.name)
    want = _TYPES[str(f.type)]
    if want is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None, Problem(path, line, key, f"got {value!r}, expected a list of strings",
                                 f"write e.g. {f.name} = {_toml_value(f.default)}")
        bad = [v for v in value if f.metadata["choices"] and v not in f.metadata["choices"]]
        if bad or not value:
            return None, Problem(path, line, key, f"got {value!r}",
                                 f"use a non-empty list of: {', '.join(f.metadata['choices'])}")
        return tuple(value), None
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        return None, Problem(
            path, line, key, f"got {value!r}, expected {_type_name(want)}",
            f"write e.g. {f.name} = {_toml_value(f.default)}",
        )
    meta = f.metadata
    if meta["choices"] and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return None, Problem(
            path, line, key, f"got {value!r}", f"{hint}allowed: {', '.join(meta['choices'])}"
        )
    low, high = meta["min"], meta["max"]
    if (low is not None and value < low) or (high is not None and value > high):
        return None, Problem(
            path, line, key, f"got {value!r}, out of range", f"use a value from {low} to {high}"
        )
    return value, None


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _merge_layer(
    merged: dict[str, dict[str, Any]],
    origins: dict[str, str],
    data: Mapping[str, Any],
    path: str,
    text: str,
    problems: list[Problem],
) -> None:
    for section, body in data.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            fix = f"did you mean [{close[0]}]?" if close else f"sections: {', '.join(SECTIONS)}"
            problems.append(Problem(path, _line_of(text, section, None), f"[{section}]", "unknown section", fix))
            continue
        if not isinstance(body, dict):
            problems.append(Problem(path, None, section, "must be a [section] table", f"write [{section}]"))
            continue
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        for key, value in body.items():
            f = fields.get(key)
            if f is None:
                close = difflib.get_close_matches(key, fields, n=1)
                fix = f"did you mean `{close[0]}`?" if close else f"keys: {', '.join(fields)}"
                if f"{key}_file" in fields:
                    fix = (f"secrets are never written in the TOML: put it in a file (chmod 600)"
                           f" and set `{key}_file` to its path")
                problems.append(
                    Problem(path, _line_of(text, section, key), f"[{section}] {key}", "unknown key", fix)
                )
                continue
            checked, problem = _check_value(section, f, value, path, text)
            if problem:
                problems.append(problem)
                continue
            merged.setdefault(section, {})[key] = checked
            origins[f"{section}.{key}"] = path


def _credentials_dir() -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(directory) if directory else None


def read_secret_file(reference: str, key: str, origin: str) -> tuple[Secret | None, Problem | None]:
    """Read a secret from a file path, or from a systemd credential of that name."""
    candidate = Path(reference)
    creds = _credentials_dir()
    if not candidate.is_absolute() and "/" not in reference and creds is not None:
        candidate = creds / reference
    try:
        st = candidate.stat()
    except FileNotFoundError:
        if creds is not None and candidate.parent == creds:
            # systemd copies credentials at start only: a reload cannot pick a new one up
            return None, Problem(origin, None, key, f"systemd credential {reference!r} was not found",
                                 f"put the secret in /etc/credstore/{reference} (chmod 600), "
                                 "then `systemctl restart appliance`")
        return None, Problem(origin, None, key, f"secret file {candidate} does not exist",
                             f"create it with the secret and `chmod 600 {candidate}`")
    except PermissionError:
        return None, Problem(origin, None, key, f"secret file {candidate} is not readable by this user",
                             f"`chown appliance {candidate}` or use systemd LoadCredential=")
    # systemd credentials live on a private, read-only mount: their mode is the service's business
    in_creds = creds is not None and candidate.parent == creds
    if not in_creds and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return None, Problem(origin, None, key,
                             f"secret file {candidate} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o})",
                             f"`chmod 600 {candidate}`")
    try:
        value = candidate.read_text().strip()
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        return None, Problem(origin, None, key, f"cannot read secret file {candidate}: {type(exc).__name__}",
                             "make it a readable text file holding only the secret")
    if not value:
        return None, Problem(origin, None, key, f"secret file {candidate} is empty", "write the secret into it")
    return Secret(value, str(candidate)), None


def parse_layers(layers: list[tuple[str, str]]) -> Config:
    """Build a Config from (path, text) TOML layers, lowest priority first.

    Raises ConfigError listing every problem in every layer.
    """
    merged: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    problems: list[Problem] = []
    for path, text in layers:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            match = re.search(r"line (\d+), column (\d+)", str(exc))
            # "at end of document" has no position: the last line is where it went wrong
            line = int(match.group(1)) if match else text.count("\n") + 1
            curly = config_text.smart_quote_problems(text, line)
            problems.extend(Problem(path, p.line, p.key, p.message, p.fix) for p in curly)
            if not curly:
                problems.append(Problem(path, line, "", f"TOML syntax error: {exc}",
                                        "fix the line (strings need quotes, tables need [brackets])"))
            continue
        _merge_layer(merged, origins, data, path, text, problems)

    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        sections[name] = cls(**merged.get(name, {}))

    texts = dict(layers)
    problems.extend(_cross_checks(sections, origins, texts))
    secrets: dict[str, Secret] = {}
    secret_problems: list[Problem] = []
    for section, f in iter_settings():
        if not f.metadata["secret_file"]:
            continue
        reference = getattr(sections[section], f.name)
        if not reference:
            continue
        origin = origins.get(f"{section}.{f.name}", "default")
        secret, problem = read_secret_file(reference, f"[{section}] {f.name}", origin)
        if problem:
            secret_line = _line_of(texts.get(origin, ""), section, f.name)
            secret_problems.append(dataclasses.replace(problem, line=secret_line))
        elif secret:
            secrets[f"{section}.{f.name.removesuffix('_file')}"] = secret

    if problems or secret_problems:
        usable = None
        if not problems:
            usable = Config(**sections, secrets=secrets, origins=origins)
        raise ConfigError(problems + secret_problems, usable)
    return Config(**sections, secrets=secrets, origins=origins)


def _cross_checks(
    sections: Mapping[str, Any], origins: Mapping[str, str], texts: Mapping[str, str]
) -> list[Problem]:
    """Rules that involve several settings; each problem points at where a value was set."""

    def where(name: str) -> tuple[str, int | None]:
        path = origins.get(name, "default")
        section, key = name.split(".")
        return path, _line_of(texts.get(path, ""), section, key)

    problems = []
    lk: LiveKitSection = sections["livekit"]
    if not re.match(r"^wss?://", lk.url):
        problems.append(Problem(*where("livekit.url"), "[livekit] url", f"got {lk.url!r}",
                                "use ws://host:7880 or wss://host"))
    if lk.api_key and lk.token_url:
        problems.append(Problem(*where("livekit.token_url"), "[livekit] token_url",
                                "both api_key and token_url are set", "keep only one of them"))
    if lk.api_key and not lk.api_secret_file:
        problems.append(Problem(*where("livekit.api_key"), "[livekit] api_secret_file",
                                "api_key is set but no secret file", "set api_secret_file to a file holding the secret"))
    avatar: AvatarSection = sections["avatar"]
    if avatar.runtime == "bithuman" and not avatar.model:
        problems.append(Problem(*where("avatar.runtime"), "[avatar] model",
                                "runtime is bithuman but no model is set", "set model to the .imx file"))
    models: ModelsSection = sections["models"]
    if models.manifest_url and not models.public_key:
        problems.append(Problem(*where("models.manifest_url"), "[models] public_key",
                                "manifest_url is set but no public_key to verify it",
                                "set public_key to the base64 ed25519 key from `appliance models keygen`"))
    if models.update_window and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d",
                                                 models.update_window):
        problems.append(Problem(*where("models.update_window"), "[models] update_window",
                                f"got {models.update_window!r}", 'write HH:MM-HH:MM, e.g. "02:00-05:00"'))
    fallback: FallbackSection = sections["fallback"]
    if "gpu" in fallback.ladder and not fallback.gpu_api_url:
        problems.append(Problem(*where("fallback.ladder"), "[fallback] gpu_api_url",
                                "the ladder has gpu but no gpu_api_url", "set gpu_api_url or remove gpu"))
    if "cloud" in fallback.ladder and not fallback.cloud_avatar_id:
        problems.append(Problem(*where("fallback.ladder"), "[fallback] cloud_avatar_id",
                                "the ladder has cloud but no cloud_avatar_id", "set cloud_avatar_id or remove cloud"))
    return problems


# The layers on a kiosk, lowest priority first (the packaged defaults are implicit).
ETC_CONFIG = Path("/etc/appliance/appliance.toml")
ETC_DROPINS = Path("/etc/appliance/appliance.d")
# /boot/firmware/appliance.toml, copied here by appliance-boot-config.service at boot
# once it validated: the boot partition is FAT and may be yanked, so it is never read live.
BOOT_IMPORTED = Path("/var/lib/appliance/boot-config.toml")


def last_good_path() -> Path | None:
    """Where the last configuration that loaded is kept: systemd's StateDirectory."""
    directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if not directory and os.access("/var/lib/appliance", os.W_OK):
        directory = "/var/lib/appliance"
    return Path(directory) / "last-good.toml" if directory else None


def save_last_good(config: Config) -> None:
    """Atomically keep a snapshot of a config that loaded (best effort: a full disk only warns)."""
    path = last_good_path()
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(render_snapshot(config), encoding="utf-8")
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        import logging

        logging.getLogger("appliance.config").warning("cannot keep the last good config in %s: %s", path, exc)


def load_last_good() -> Config | None:
    path = last_good_path()
    if path is None or not path.exists():
        return None
    try:
        return load_config([path])
    except ConfigError as exc:
        return exc.usable


def config_paths(explicit: list[str] | None = None) -> list[Path]:
    """The TOML layers to read; ``--config`` files replace the kiosk's layers."""
    if explicit:
        return [Path(p) for p in explicit]
    paths = [ETC_CONFIG] if ETC_CONFIG.exists() else []
    if ETC_DROPINS.is_dir():
        paths += sorted(ETC_DROPINS.glob("*.toml"))
    if BOOT_IMPORTED.exists():
        paths.append(BOOT_IMPORTED)
    return paths


def decode_toml(path: str, raw: bytes) -> str:
    """The text of an operator's TOML file (BOM and CRLF accepted); ConfigError if not UTF-8.

    Every reader of operator TOML decodes through here (see ``config_text``).
    """
    try:
        return config_text.decode(raw)
    except config_text.TextProblem as exc:
        raise ConfigError([Problem(path, exc.line, exc.key, exc.message, exc.fix)]) from None


def load_config(paths: list[Path]) -> Config:
    """Read the TOML files (lowest priority first) and build the Config."""
    layers: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            layers.append((str(path), decode_toml(str(path), path.read_bytes())))
        except FileNotFoundError:
            problems.append(Problem(str(path), None, "", "file does not exist", "check the path"))
        except OSError as exc:
            problems.append(Problem(str(path), None, "", f"cannot read: {exc.strerror or type(exc).__name__}",
                                    "make it a readable UTF-8 text file"))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:  # the readable layers are checked too: every problem at once
        try:
            parse_layers(layers)
        except ConfigError as exc:
            problems.extend(exc.problems)
        raise ConfigError(problems)
    return parse_layers(layers)


def render_default_toml() -> str:
    """The documented default file, every key present and commented (config/appliance.toml)."""
    out = [
        "# Avatar kiosk appliance configuration.",
        "# Every setting is shown with its default. Edit on the kiosk at /etc/appliance/appliance.toml,",
        "# or before first boot at /boot/firmware/appliance.toml. Secrets never go here: *_file keys",
        "# name a file (chmod 600) or a systemd credential.",
        "# Generated from appliance/config.py: `appliance config defaults > config/appliance.toml`.",
    ]
    for section, cls in SECTIONS.items():
        out.append("")
        out.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            extra = []
            if meta["choices"]:
                extra.append("one of: " + ", ".join(meta["choices"]))
            if meta["min"] is not None:
                extra.append(f"range {meta['min']}..{meta['max']}")
            if not meta["reload"]:
                extra.append("takes effect on restart")
            out.append(f"# {meta['help']}" + (f" ({'; '.join(extra)})" if extra else ""))
            out.append(f"# {f.name} = {_toml_value(f.default)}")
    return "\n".join(out) + "\n"


def effective_values(config: Config) -> dict[str, Any]:
    """``section.key`` → value for every setting (secret *files* are paths, never secrets)."""
    values: dict[str, Any] = {}
    for section, f in iter_settings():
        value = getattr(getattr(config, section), f.name)
        values[f"{section}.{f.name}"] = list(value) if isinstance(value, tuple) else value
    return values


def notes(config: Config) -> list[str]:
    """Valid settings this version does not act on yet: said plainly rather than ignored."""
    out = []
    remote = [rung for rung in config.fallback.ladder if rung != "local"]
    if remote:
        out.append(f"[fallback] ladder: {', '.join(remote)} not available in this version "
                   "— the kiosk serves with the local runtime only")
    if config.audio.microphone:
        out.append("[audio] microphone: not published in this version — the kiosk publishes the "
                   "avatar's voice as its microphone track, so the visitor's microphone needs a "
                   "second participant (and echo cancellation) first")
    return out


def render_snapshot(config: Config) -> str:
    """The config as one TOML file (non-default values; secrets only as file paths)."""
    out = ["# the last configuration that loaded; used when the current one cannot be"]
    for section, cls in SECTIONS.items():
        body, default = getattr(config, section), cls()
        changed = [f for f in dataclasses.fields(body) if getattr(body, f.name) != getattr(default, f.name)]
        if changed:
            out.append(f"[{section}]")
            out += [f"{f.name} = {_toml_value(getattr(body, f.name))}" for f in changed]
    return "\n".join(out) + "\n"


def describe(config: Config) -> str:
    """The effective config as TOML, each value with where it came from; secrets redacted."""
    out = []
    for section in SECTIONS:
        out.append(f"[{section}]")
        body = getattr(config, section)
        for f in dataclasses.fields(body):
            origin = config.origins.get(f"{section}.{f.name}", "default")
            out.append(f"{f.name} = {_toml_value(getattr(body, f.name))}  # {origin}")
        out.append("")
    for name, secret in config.secrets.items():
        out.append(f"# secret {name}: <redacted>, read from {secret.source}")
    return "\n".join(out) + "\n"
