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


def test_aggregator_modules_do_not_import_their_package():
    """``aggregators/__init__`` imports every aggregator module; one importing a name back
    from the package would depend on how far the package's import had got (a cycle)."""
    import ast
    from pathlib import Path

    package = Path(REPO_ROOT) / "fedjax_sim" / "aggregators"
    submodules = {p.stem for p in package.glob("*.py")}
    for path in package.glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "fedjax_sim.aggregators":
                names = {a.name for a in node.names}
                assert names <= submodules, f"{path.name} imports {names - submodules}"
