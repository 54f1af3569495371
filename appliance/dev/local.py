"""The embedded development setup of `make run`: a local LiveKit-compatible server, the
kiosk pointed at it, and the bundled example agent (``example_agent.py``) registered with it,
dispatched for each visitor (``[agent] name`` defaults to it here).

The dev server's API secret is generated once per user and kept in a 0600 file
(never in a TOML file), so `appliance demo` in another terminal can mint
tokens for the same server.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
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
    """Point [livekit] at the dev server, and [agent] at the example agent unless the operator
    named their own (the rest of the config stays the operator's)."""
    from appliance.dev.example_agent import AGENT_NAME

    livekit = dataclasses.replace(config.livekit, url=dev_url(), api_key=DEV_API_KEY, token_url="")
    agent = config.agent if config.agent.name else dataclasses.replace(config.agent, name=AGENT_NAME)
    secrets_ = dict(config.secrets)
    secrets_["livekit.api_secret"] = dev_secret()
    return dataclasses.replace(config, livekit=livekit, agent=agent, secrets=secrets_)


def start_example_agent(server: DevServer) -> subprocess.Popen[bytes]:
    """The example agent's worker, registered with ``server`` (its own process group: Ctrl-C
    reaches the kiosk, which stops it)."""
    env = dict(os.environ, LIVEKIT_URL=server.url, LIVEKIT_API_KEY=server.api_key,
               LIVEKIT_API_SECRET=server.api_secret)
    return subprocess.Popen([sys.executable, "-m", "appliance.dev.example_agent", "start",
                             "--log-level", "warn"], env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def stop_example_agent(worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    try:
        worker.wait(15)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def dev_banner(server: DevServer, config: Config, example_agent: bool) -> str:
    """What `appliance run --dev` prints: where to watch, how a visitor arrives."""
    from appliance.dev.server.viewer import client_installed, missing_client_help

    watch = (f"  Watch and hear the avatar in a browser on this machine: {server.viewer_url}"
             if client_installed() else f"  No browser viewer: {missing_client_help()}.")
    socket = "" if config.status.socket == "/run/appliance/status.sock" else f" --socket {config.status.socket}"
    agent = (f"the example agent {config.agent.name!r} greets each visitor and answers them"
             if example_agent else f"agent {config.agent.name!r} (start its worker against {server.url})")
    return (
        f"\nappliance: dev server on {server.url}, room {config.livekit.room!r}; {agent}.\n{watch}\n"
        f"  A visitor arrives: `appliance presence arrive{socket}` in another terminal"
        f" (and leaves: `appliance presence leave{socket}`).\n"
        "  Or make the avatar speak a sentence: `make demo` (also writes demo.mp4).\n"
        "  Stop with Ctrl-C.\n"
    )
