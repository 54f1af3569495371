"""ruff and mypy are part of the test suite."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "appliance", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "appliance"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_serving_path_imports_nothing_from_dev() -> None:
    """Development-only code (dev server, demo, bench, netns) stays off a kiosk's serving path."""
    code = (
        "import sys, appliance.cli, appliance.supervisor, appliance.renderer.child, appliance.config.boot\n"
        "print(','.join(sorted(m for m in sys.modules if m == 'appliance.dev' or m.startswith('appliance.dev.'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported on the serving path: {result.stdout.strip()}"
