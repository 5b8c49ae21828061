"""The Colab notebooks run end to end (on the tiny model, to stay fast)."""

import pathlib
import runpy

import numpy as np
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "colab").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("KVJAX_QUICKSTART_MODEL", "tiny")
    scope = runpy.run_path(str(path))
    assert all(np.isfinite(v) for v in scope["results"].values())
    assert scope["out"].tokens.shape == (1, 16)
