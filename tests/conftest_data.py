"""Helpers for tests that read the real files in the shared data directory.

``real_data(relative)`` returns ``<data root>/<relative>``. When it is missing the test is
skipped with the reason, except in CI (``CI=true``), where the files must be present and the
test fails instead. The data root is ``$FEDJAX_SIM_DATA_DIR``, else ``<repo>/../shared/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedjax_sim.data.files import DATA_DIR_ENV, default_data_dir


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def real_data(relative: str) -> Path:
    """The real file or folder ``relative`` under the data root; skip (or, in CI, fail) when
    it is missing."""
    path = default_data_dir() / relative
    if path.exists():
        return path
    reason = (
        f"real data {path} is missing (set ${DATA_DIR_ENV} to the folder holding the shared "
        f"data: mnist/, femnist_leaf/, shakespeare/, cifar10_jpeg/)"
    )
    if in_ci():
        pytest.fail(f"CI=true and {reason}.")
    pytest.skip(reason)
