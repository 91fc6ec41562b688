"""The code passes the project's linter and formatter (ruff, configured in pyproject.toml)."""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

PATHS = ["fedjax_sim", "tests", "configs", "scripts"]


def ruff(*args):
    exe = shutil.which("ruff")
    cmd = [exe] if exe else [sys.executable, "-m", "ruff"]
    return subprocess.run([*cmd, *args, *PATHS], cwd=REPO_ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("args", [("check",), ("format", "--check")])
def test_ruff(args):
    result = ruff(*args)
    assert result.returncode == 0, result.stdout + result.stderr
