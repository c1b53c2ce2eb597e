"""Virtual environments for Triton's own tools, built once per machine and then reused.

tritonclient 2.7x wants protobuf >= 6, and perf_analyzer ships inside an older tritonclient wheel
with its own grpcio; our pins exclude both, so each lives in its own venv under
$FEATURESERVE_CACHE (default ~/.cache/featureserve), rebuilt when its package list changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("FEATURESERVE_CACHE", Path.home() / ".cache" / "featureserve"))
INSTALL_TIMEOUT_S = 900
MARKER = "featureserve-packages.txt"


def cached_venv(name: str, packages: list[str]) -> Path:
    """The root of venv `name` with exactly `packages` pip-installed (built on first use)."""
    venv = CACHE / name
    wanted = "\n".join(packages)
    marker = venv / MARKER
    if marker.exists() and marker.read_text() == wanted:
        return venv
    staging = venv.with_name(f"{name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, timeout=120)
    subprocess.run(
        [str(staging / "bin" / "python"), "-m", "pip", "install", "-q", *packages],
        check=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    (staging / MARKER).write_text(wanted)
    shutil.rmtree(venv, ignore_errors=True)
    staging.rename(venv)
    return venv
