"""The embedded development setup: a local LiveKit-compatible server for `make run`.

The dev server's API secret is generated once per user and kept in a 0600 file
(never in a TOML file), so `appliance demo` in another terminal can mint
tokens for the same server.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import Config, Secret

if TYPE_CHECKING:
    from appliance.dev.server import DevServer

DEV_HOST = "127.0.0.1"
DEV_PORT = 7880
DEV_API_KEY = "devkey"


def dev_secret_path() -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "appliance" / "dev-api-secret"


def dev_secret() -> Secret:
    """The dev server's secret, created on first use (mode 0600)."""
    path = dev_secret_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
    return Secret(path.read_text().strip(), str(path))


def dev_url() -> str:
    return f"ws://{DEV_HOST}:{DEV_PORT}"


async def start_dev_server(viewer_room: str | None = None) -> DevServer:
    """Start the dev server on DEV_HOST:DEV_PORT with the per-user secret.

    With `viewer_room`, its browser viewer (`server.viewer_url`) watches that room."""
    from appliance.dev.server import DevServer

    server = DevServer(host=DEV_HOST, port=DEV_PORT, api_key=DEV_API_KEY,
                       api_secret=dev_secret().reveal(), viewer_room=viewer_room)
    await server.start()
    return server


def dev_overrides(config: Config) -> Config:
    """Point [livekit] at the dev server (the rest of the config stays the operator's)."""
    livekit = dataclasses.replace(config.livekit, url=dev_url(), api_key=DEV_API_KEY, token_url="")
    secrets_ = dict(config.secrets)
    secrets_["livekit.api_secret"] = dev_secret()
    return dataclasses.replace(config, livekit=livekit, secrets=secrets_)


def dev_banner(server: DevServer, room: str) -> str:
    """What `appliance run --dev` prints: where to watch, and how to make the avatar speak."""
    from appliance.dev.server.viewer import client_installed, missing_client_help

    watch = (f"  Watch and hear the avatar in a browser on this machine: {server.viewer_url}"
             if client_installed() else f"  No browser viewer: {missing_client_help()}.")
    return (
        f"\nappliance: dev server on {server.url}, room {room!r}.\n{watch}\n"
        "  To make it speak: `make demo` in another terminal (also writes demo.mp4).\n"
        "  Stop with Ctrl-C.\n"
    )
