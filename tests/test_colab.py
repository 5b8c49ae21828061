"""The Colab notebooks: each runs end to end on the tiny model (as `KVJAX_NOTEBOOK_MODEL=tiny`),
its .ipynb is the .py's cells, and each opens with what it shows, the runtime it needs and one setup cell."""

import json
import math
import pathlib
import runpy

import jax
import jupytext
import matplotlib
import numpy as np
import pytest
from flax import nnx

from kvjax.plan import parse_bytes

COLAB = pathlib.Path(__file__).parents[1] / "colab"
NOTEBOOKS = sorted(p.stem for p in COLAB.glob("*.py"))


def check_quickstart(scope):
    assert set(scope["results"]) == {"full", "window", "streaming_llm", "h2o", "tova"}
    assert all(math.isfinite(v) and v > 1 for v in scope["results"].values())
    assert scope["out"].tokens.shape == (1, 16) and isinstance(scope["text"], str) and scope["text"]


def check_policies(scope):
    grid, rows = scope["grid"], scope["rows"]
    expected = {(t, p, pr) for t in grid["tasks"] for p in ["full", *grid["policies"]] for pr in ("kvpress", "streaming")}
    assert {(r["task"], r["policy"], r["protocol"]) for r in rows} == expected
    assert all(0 <= r["score"] <= 1 and r["samples"] == grid["samples"] for r in rows)
    assert len(scope["fig"].axes) == 2 and "| snapkv | 0.5 |" in scope["table"]


def check_seed_methods(scope):
    budget = parse_bytes(scope["BUDGET"])
    assert all(plan.nbytes <= budget for plan in scope["plans"].values())
    assert scope["plans"]["pod"].nbytes < scope["unshared"]  # the tiny model's layers form one block: shared keys save bytes
    assert len(scope["profile"].mergeable) == scope["model"].cfg.num_layers
    assert all(math.isfinite(v) for v in scope["results"].values())


def check_dmc_retrofit(scope):
    assert [len(log) for log in scope["logs"].values()] == [1, 6, 3]  # 10% zero-out, 60% ramp, 30% fine-tune
    trained, resumed = (jax.tree.leaves(nnx.state(scope[k], nnx.Param)) for k in ("retrofitted", "resumed"))
    assert all(np.array_equal(a, b) for a, b in zip(trained, resumed, strict=True))  # the resume restored the trained weights
    assert all(math.isfinite(r["perplexity"]) and r["cr"] >= 1 for r in scope["results"].values())


def check_long_context(scope):
    for name in scope["POLICIES"]:
        grid = scope["accuracy"][name]
        assert grid.shape == (len(scope["DEPTHS"]), len(scope["LENGTHS"])) and ((grid >= 0) & (grid <= 1)).all()


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def test_every_notebook_has_checks():
    assert sorted(CHECKS) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_the_tiny_model(name, monkeypatch, tmp_path):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("KVJAX_NOTEBOOK_MODEL", "tiny")
    monkeypatch.chdir(tmp_path)  # results and checkpoints land here
    plt.close("all")
    scope = runpy.run_path(str(COLAB / f"{name}.py"))
    if name != "quickstart":
        assert plt.get_fignums(), f"{name} draws no plot"
    plt.close("all")
    CHECKS[name](scope)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_pairs_and_opening(name):
    source = jupytext.read(COLAB / f"{name}.py")
    notebook = json.loads((COLAB / f"{name}.ipynb").read_text())
    cells = lambda nb: [(c["cell_type"], "".join(c["source"]).strip()) for c in nb["cells"]]  # noqa: E731
    assert cells(notebook) == cells(source), f"colab/{name}.ipynb is stale: run jupytext --to ipynb colab/{name}.py"
    first, setup = source.cells[0], [c for c in source.cells if c.cell_type == "code" and "google.colab" in c.source]
    assert first.cell_type == "markdown" and "**Runtime:**" in first.source
    assert len(setup) == 1 and "= setup(" in setup[0].source  # prints the devices and the attention implementation
