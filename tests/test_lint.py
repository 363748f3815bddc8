"""The linter and the formatter (ruff, configured in pyproject.toml) pass on the whole repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        import ruff  # noqa: F401  (the dev extra installs it; its binary runs as `python -m ruff`)
    except ImportError:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", str(ROOT)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_ruff_check_finds_nothing():
    out = _ruff("check")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_would_change_nothing():
    out = _ruff("format", "--check")
    assert out.returncode == 0, out.stdout + out.stderr
