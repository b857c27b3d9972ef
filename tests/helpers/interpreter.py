"""Run a test module's ``--interpret`` entry point under Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, and must not leak into the GPU tests of
the same pytest session, hence a subprocess. The script prints one JSON line last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(script: str | Path, timeout: int = 600) -> dict:
    """``python script --interpret`` with ``TRITON_INTERPRET=1``; its last stdout line as JSON."""
    # Triton is a dev dependency on Linux (pyproject): a missing install must fail, not skip.
    if not sys.platform.startswith("linux"):
        pytest.skip("Triton's interpreter is only installed on Linux")
    import triton  # noqa: F401

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(script), "--interpret"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
