"""Every script in scripts/ runs the way the README shows it, ``python scripts/NAME.py``, and none
of them shadows a module. Python puts scripts/ first on sys.path when it runs one of them, so a
script named like a module that something imports is imported in its place: scripts/compression.py
stood for the ``compression`` package that JAX's compilation cache imports (Python 3.14's
``compression.zstd``), and ``import jax`` failed in every script. The other tests load scripts
through importlib, which never puts scripts/ on sys.path."""

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = REPO_ROOT / "scripts"
# Globbed, so a new script is covered without touching this file.
SCRIPTS = sorted(SCRIPTS_DIR.glob("*.py"))
# Top-level modules of the standard library in Pythons newer than the one running the tests,
# which sys.stdlib_module_names here does not list (3.14: PEP 784 and PEP 749).
NEWER_STDLIB = {"compression", "annotationlib"}


def test_every_script_prints_its_usage_when_run_as_the_readme_shows(tmp_path):
    assert SCRIPTS
    # Started all at once, then awaited: each run is mostly importing JAX. Output goes to files,
    # so no child blocks on a full pipe while the test waits on another.
    runs = {}
    try:
        for script in SCRIPTS:
            out, err = tmp_path / f"{script.stem}.out", tmp_path / f"{script.stem}.err"
            with out.open("w") as fo, err.open("w") as fe:
                cmd = [sys.executable, f"scripts/{script.name}", "--help"]
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=fo, stderr=fe)
            runs[script.name] = (proc, out, err)
        failures = {}
        for name, (proc, out, err) in runs.items():
            rc = proc.wait(timeout=300)
            stdout = out.read_text()
            # argparse names the program after the file it was run as.
            if rc != 0 or not stdout.startswith(f"usage: {name} "):
                failures[name] = f"exit {rc}\n{stdout[-500:]}\n{err.read_text()[-3000:]}"
    finally:
        for proc, _, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not failures, "\n\n".join(f"python scripts/{n} --help: {m}" for n, m in failures.items())


def module_level_imports(path: Path) -> set[str]:
    """The modules ``path`` imports at module level (absolute imports only)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            names.add(node.module)
    return names


# Run from an empty directory: first whether each stem is a module without scripts/ on the path,
# then, with scripts/ first on it as when a script runs, the scripts' own imports, after which
# no module may have been loaded from scripts/ (a shadowed import that happened not to fail).
PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, json, os, sys
    stems, imports, scripts_dir = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    importable = [s for s in stems if importlib.util.find_spec(s) is not None]
    sys.path.insert(0, scripts_dir)
    errors = {}
    for name in imports:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            pass  # not installed here; the --help runs show whether a script needs it
        except Exception as e:
            errors[name] = repr(e)
    loaded = sorted(
        name for name, m in list(sys.modules.items())
        if os.path.dirname(os.path.abspath(getattr(m, "__file__", None) or "/")) == scripts_dir
    )
    print(json.dumps({"importable": importable, "errors": errors, "loaded": loaded}))
    """
)


def shadowing(scripts_dir: Path, cwd: Path) -> dict:
    scripts = sorted(scripts_dir.glob("*.py"))
    stems = [s.stem for s in scripts]
    imports = set().union(*(module_level_imports(s) for s in scripts)) - set(stems)
    args = [json.dumps(stems), json.dumps(sorted(imports)), str(scripts_dir.resolve())]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    found["stdlib"] = [s for s in stems if s in sys.stdlib_module_names or s in NEWER_STDLIB]
    return found


def test_no_script_is_named_like_a_module(tmp_path):
    found = shadowing(SCRIPTS_DIR, tmp_path)
    assert found == {"importable": [], "stdlib": [], "errors": {}, "loaded": []}, found
