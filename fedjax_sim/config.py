"""Loading experiment configs and applying ``--config.FIELD=VALUE`` overrides."""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import sys
from pathlib import Path

import ml_collections

DEFAULT_CONFIG = "default"


class ConfigFileError(ValueError):
    """A config file that does not run: ``FILE:LINE: message``."""


def _where(e: BaseException, path: Path) -> str:
    """``FILE:LINE`` of the innermost frame of ``e``'s traceback inside ``path``."""
    import traceback

    target = str(Path(path).resolve())
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if str(Path(frame.filename).resolve()) == target:
            line = frame.lineno
    return f"{path}:{line}" if line is not None else str(path)


def _load_module(path_or_name: str):
    path = Path(path_or_name)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(
                f"config file {str(path)!r} does not exist; pass --config with the path of a "
                "config .py file (see configs/ for examples)."
            )
        name = f"_fedjax_sim_config_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except SyntaxError as e:
            raise ConfigFileError(f"{e.filename or path}:{e.lineno}: {e.msg}") from None
        except Exception as e:
            raise ConfigFileError(f"{_where(e, path)}: {type(e).__name__}: {e}") from None
        return module
    try:
        return importlib.import_module(f"fedjax_sim.configs.{path_or_name}")
    except ModuleNotFoundError as e:
        known = sorted(
            p.stem
            for p in Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.py")
            if p.stem != "__init__"
        )
        raise FileNotFoundError(
            f"no config file or built-in config named {path_or_name!r}; built-in: "
            f"{', '.join(known) or '(none found)'}."
        ) from e


def load_config(spec: str | None = None) -> ml_collections.ConfigDict:
    """Loads ``FILE.py[:variant]`` (or a built-in config name) and calls ``get_config``."""
    spec = spec or DEFAULT_CONFIG
    path, _, variant = spec.partition(":")
    module = _load_module(path)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config {path!r} has no get_config() function.")
    try:
        config = module.get_config(variant or None)
    except Exception as e:
        file = getattr(module, "__file__", None) or path
        raise ConfigFileError(
            f"{_where(e, Path(file))}: get_config({variant or None!r}) raised "
            f"{type(e).__name__}: {e}"
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"get_config() in {path!r} must return an ml_collections.ConfigDict.")
    return config


def _parse_value(text: str, current):
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(f"cannot parse {text!r} as a {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets ``config.<dotted> = parse(text)``; an unknown field is an error with suggestions.

    Fields inside a ``kwargs`` dict (arguments passed through to a dataset, model or
    optimizer) may be new.
    """
    parts = dotted.split(".")
    node = config
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        is_kwargs = parts[i - 1].endswith("kwargs") if i else False
        if part not in node:
            if is_kwargs and last:
                node[part] = _parse_value(text, None)
                return
            where = ".".join(parts[:i]) or "config"
            close = difflib.get_close_matches(part, list(node.keys()), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise KeyError(
                f"config has no field {dotted!r} ({where} has: {', '.join(sorted(node.keys()))})."
                + hint
            )
        if last:
            current = node[part]
            if isinstance(current, ml_collections.ConfigDict):
                raise ValueError(f"{dotted!r} is a group of fields; set one of its fields.")
            try:
                value = _parse_value(text, current)
                node[part] = value
            except (ValueError, TypeError) as e:
                raise ValueError(f"bad value for config field {dotted!r}: {e}") from None
            return
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise KeyError(f"config field {'.'.join(parts[: i + 1])!r} is not a group.")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    for dotted, text in overrides.items():
        apply_override(config, dotted, text)


def check_known_fields(config: ml_collections.ConfigDict, reference) -> None:
    """Fails on fields of ``config`` that the reference config does not have (typos in files)."""

    def walk(node, ref, prefix):
        for key in node.keys():
            path = f"{prefix}{key}"
            if prefix.endswith("kwargs.") or key not in ref:
                if not prefix.endswith("kwargs."):
                    close = difflib.get_close_matches(key, list(ref.keys()), n=3)
                    hint = f" Did you mean {', '.join(close)}?" if close else ""
                    raise KeyError(f"unknown config field {path!r}.{hint}")
                continue
            if isinstance(node[key], ml_collections.ConfigDict) and isinstance(
                ref[key], ml_collections.ConfigDict
            ):
                walk(node[key], ref[key], path + ".")

    walk(config, reference, "")
