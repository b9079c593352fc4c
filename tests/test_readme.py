"""The README's Python snippets run as written."""

import os
import re
import warnings

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), flags=re.S)


def test_readme_snippets_run_as_written():
    blocks = python_blocks()
    assert blocks, "README.md has no python snippet"
    for code in blocks:
        namespace = {}
        with warnings.catch_warnings():
            # what a user who copies the snippet sees: no warning at all
            warnings.simplefilter("error")
            exec(compile(code, README, "exec"), namespace)
        est = namespace["est"]
        assert np.isfinite(est.score(namespace["X_test"]))
        assert est.sample(3, random_state=0).shape == (3, namespace["X"].shape[1])
