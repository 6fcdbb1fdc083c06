"""Build the image from the real Dockerfile with buildah and run it on a tiny dataset.

Opt-in (about 10-20 minutes on 2 cores, needs root, buildah, debootstrap and the Debian
mirror and PyPI): ``python -m pytest -m container tests/test_container.py``. Everything
happens in tests/container/build_and_run.sh, which can also be run by hand; its
measurements (build time, image size, run times) are printed at the end.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.container, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "container" / "build_and_run.sh"


@pytest.fixture()
def opted_in(request):
    if "container" not in (request.config.getoption("-m") or ""):
        pytest.skip("opt-in: run with  python -m pytest -m container tests/test_container.py")
    if os.geteuid() != 0:
        pytest.skip("buildah with chroot isolation and vfs storage needs root here")
    missing = [tool for tool in ("buildah", "debootstrap", "unshare") if shutil.which(tool) is None
               and not Path("/usr/sbin", tool).exists()]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install -y buildah debootstrap")


def test_build_and_run_image(opted_in, tmp_path):
    results = tmp_path / "results.env"
    env = {**os.environ, "RESULTS": str(results), "PYTHON": sys.executable}
    done = subprocess.run([str(SCRIPT), "all"], env=env, capture_output=True, text=True, timeout=90 * 60)
    print(done.stderr[-5000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    measured = dict(line.split("=", 1) for line in results.read_text().splitlines() if "=" in line)
    print("measurements:", measured)
    assert measured.get("run_ok") == "1"
    assert int(measured["image_mb"]) < 2500, "the image grew unexpectedly"
