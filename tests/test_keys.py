"""Every source of randomness is named once, in ``core/keys.py``, and no two collide."""

import ast
from pathlib import Path

from fedjax_sim.core import keys

PACKAGE = Path(keys.__file__).resolve().parent.parent


def _named(suffix):
    return {k: getattr(keys, k) for k in dir(keys) if k.endswith(suffix)}


def test_salts_and_tags_are_distinct_ints():
    for suffix in ("_SALT", "_TAG"):
        named = _named(suffix)
        assert len(named) >= 6 and all(type(v) is int for v in named.values())
        assert len(set(named.values())) == len(named), named
    # Salts sit far above any client id or round number they are folded beside.
    assert all(v >= 2**31 - 100 for k, v in _named("_SALT").items() if k != "INIT_SALT")


def test_no_module_defines_its_own_salt():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "keys.py" and path.parent.name == "core":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    name = getattr(target, "id", "")
                    assert not name.endswith(("_SALT", "_TAG")), f"{path}: {name} (core/keys.py)"
