"""The appliance's settings, declared once.

Every setting is declared exactly once, as a field of a section dataclass
below with ``setting(...)``: its type, default, unit (in the name: ``_s``,
``_ms``, ``_mb``), range, help and whether it applies live. Validation
(``load.py``), ``config/appliance.toml``, the README table and ``appliance
config show`` are all derived from these declarations
(``tests/config/test_config.py`` proves they agree). A loaded configuration is
one frozen :class:`Config`. Secrets are never inline: ``*_file`` keys name a
file (mode 0600) or a systemd credential, and the value is held in a
``Secret`` that never prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Config", "Secret", "SECTIONS", "setting", "iter_settings", "restart_only_keys",
    "render_default_toml", "effective_values", "notes", "render_snapshot", "describe",
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
    choices: tuple[str, ...] | tuple[int, ...] | None = None,
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
    gpu_avatar_image: str = setting(
        "", "the portrait the GPU rung animates (Expression): a JPEG/PNG file on the kiosk or an "
        "https:// URL; empty = the container's default")
    cloud_api_url: str = setting("https://api.bithuman.ai", "bitHuman's cloud API (the cloud rung)")
    cloud_avatar_id: str = setting("", "bitHuman cloud avatar id (agent id) for the cloud rung")
    cloud_model: str = setting("essence-2", "the model the cloud rung asks for",
                               choices=("essence-1", "essence-2", "expression-1", "expression-2"))
    unhealthy_after_s: float = setting(
        10.0, "hand over when the local runtime produced no frame for this long", min=1, max=600
    )
    recover_after_s: float = setting(
        60.0, "take the avatar back once the local runtime has been healthy this long", min=5, max=3600
    )


@dataclass(frozen=True)
class AudioSection:
    speaker: str = setting("", "play the avatar's voice on this output device (name); empty = off")
    microphone: str = setting(
        "", "the visitor's microphone (PortAudio/ALSA device name, or part of it), published by the "
        "visitor participant; empty = off")
    speaker_volume: float = setting(1.0, "local speaker gain", min=0.0, max=2.0)
    echo_cancellation: bool = setting(
        True, "remove the avatar's voice (played on [audio] speaker) from the microphone")
    noise_suppression: bool = setting(True, "suppress steady background noise in the microphone")
    mic_when: str = setting(
        "always", "when the visitor's microphone track is live: always, or only while a visitor is "
        "present ([gpio] motion_pin / button_pin); muted otherwise", choices=("always", "presence"))
    presence_hold_s: float = setting(
        30.0, "with mic_when = \"presence\": keep the microphone live this long after the last "
        "motion or button press", min=1, max=3600)


@dataclass(frozen=True)
class VisitorSection:
    identity: str = setting(
        "", "the visitor participant's identity (kind standard: it publishes the microphone, "
        "subscribes to nothing); empty = \"<[livekit] identity>-visitor\"")


@dataclass(frozen=True)
class AgentSection:
    name: str = setting(
        "", "agent_name of the conversation agent to dispatch into the room (LiveKit explicit "
        "dispatch); empty = rely on the server's automatic dispatch (one agent when the room is created)")
    dispatch: str = setting(
        "presence", "when to have an agent in the room: for each visitor (presence: motion, the "
        "button, `appliance presence arrive`), always, or off", choices=("presence", "always", "off"))
    end_after_absent_s: float = setting(
        60.0, "end the conversation (delete the dispatch) once no visitor was seen for this long",
        min=1, max=3600)
    max_session_s: float = setting(
        1800.0, "end a conversation after this long even if someone is still there; 0 = no limit",
        min=0, max=86400)
    metadata: str = setting(
        "", "JSON object passed to the agent's job (ctx.job.metadata); the kiosk adds "
        "\"kiosk_avatar\" and \"kiosk_visitor\", the identities to talk to and through")
    join_timeout_s: float = setting(
        20.0, "say so in status when no agent joined this long after a dispatch", min=1, max=600)


@dataclass(frozen=True)
class GpioSection:
    motion_pin: str = setting("", "motion sensor input, e.g. \"GPIO17\"; empty = none")
    button_pin: str = setting("", "push button input, e.g. \"GPIO27\"; empty = none")
    led_pin: str = setting("", "status LED output, e.g. \"GPIO22\"; empty = none")


@dataclass(frozen=True)
class DisplaySection:
    enabled: bool = setting(
        True, "show the avatar full-screen on the local display (SDL2 KMSDRM); without a DRM "
        "device (a development PC) the screen is simply off"
    )
    rotate: int = setting(
        0, "turn the picture clockwise by this many degrees (a portrait-mounted monitor)",
        choices=(0, 90, 180, 270),
    )


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
    "visitor": VisitorSection,
    "agent": AgentSection,
    "gpio": GpioSection,
    "display": DisplaySection,
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
    visitor: VisitorSection = field(default_factory=VisitorSection)
    agent: AgentSection = field(default_factory=AgentSection)
    gpio: GpioSection = field(default_factory=GpioSection)
    display: DisplaySection = field(default_factory=DisplaySection)
    status: StatusSection = field(default_factory=StatusSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    # secrets read from *_file settings, keyed "section.key" (without _file)
    secrets: Mapping[str, Secret] = field(default_factory=dict)
    # "section.key" -> where the value came from (a file path or "default")
    origins: Mapping[str, str] = field(default_factory=dict)

    def secret(self, name: str) -> Secret | None:
        return self.secrets.get(name)

    @property
    def visitor_identity(self) -> str:
        return self.visitor.identity or f"{self.livekit.identity}-visitor"



def iter_settings() -> Iterable[tuple[str, dataclasses.Field[Any]]]:
    """(section name, field) for every declared setting, in declaration order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f


def restart_only_keys() -> frozenset[str]:
    """``section.key`` of every setting declared ``reload=False``: they apply at the next start."""
    return frozenset(f"{section}.{f.name}" for section, f in iter_settings() if not f.metadata["reload"])


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def render_default_toml() -> str:
    """The documented default file, every key present and commented (config/appliance.toml)."""
    out = [
        "# Avatar kiosk appliance configuration.",
        "# Every setting is shown with its default. Edit on the kiosk at /etc/appliance/appliance.toml,",
        "# or before first boot at /boot/firmware/appliance.toml. Secrets never go here: *_file keys",
        "# name a file (chmod 600) or a systemd credential.",
        "# Generated from appliance/config/schema.py: `appliance config defaults > config/appliance.toml`.",
    ]
    for section, cls in SECTIONS.items():
        out.append("")
        out.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            extra = []
            if meta["choices"]:
                extra.append("one of: " + ", ".join(map(str, meta["choices"])))
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
    if "gpu" in config.fallback.ladder:
        out.append("[fallback] ladder: a GPU session ends after the container's SESSION_IDLE_TIMEOUT (600 s "
                   "without speech); the kiosk then launches a new one and holds the picture meanwhile (a few "
                   "seconds): this version does not rotate sessions make-before-break")
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
