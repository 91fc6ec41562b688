"""The README's API example runs as written."""

import re

from tests.conftest import REPO_ROOT


def test_readme_api_example_runs():
    with open(f"{REPO_ROOT}/README.md") as f:
        text = f.read()
    code = re.search(r"## Using the API\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert int(scope["state"].round) == 50
    assert float(scope["metrics"]["train_loss"]) < 2.3  # below the initial log(10)
