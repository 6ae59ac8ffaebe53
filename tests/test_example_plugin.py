"""The external plugin package in docs/examples installs into this environment, is discovered and
listed, and passes its own tests (which use posttrain.testing)."""

import json
import os
import subprocess
import sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow  # installs the example plugin package with pip

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "posttrain-hinge"


def _pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def test_example_package_installs_lists_and_passes_its_tests(tmp_path):
    installed = _pip("install", "--no-deps", "--no-build-isolation", str(EXAMPLE))
    assert installed.returncode == 0, installed.stderr[-2000:]
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        listing = subprocess.run([sys.executable, "-m", "posttrain.cli", "plugins", "--json"], capture_output=True,
                                 text=True, env=env)
        hinge = next(p for p in json.loads(listing.stdout)["plugins"] if p["name"] == "hinge")
        assert hinge["distribution"] == "posttrain-hinge" and hinge["version"] == "0.1.0"
        assert hinge["hooks"] == ["posttrain_preference_loss"]
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                               capture_output=True, text=True, env=env, cwd=tmp_path)
        assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
        assert "4 passed" in tests.stdout
    finally:
        _pip("uninstall", "-y", "posttrain-hinge")
