"""Offline profiling on calibration text: statistics that configure a method once per model.

`merge_profile` is KVMerger's (arXiv 2407.08454, spec §2): key similarity between
neighbouring tokens is a property of the model, not of the data, so the
mergeable fraction of each layer is measured once and sets per-layer budgets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.policies import make
from kvjax.policies.merging import cosine
from kvjax.protocol import CachedDecoder
from kvjax.run import pad_to_chunks, prefill


@dataclasses.dataclass(frozen=True)
class MergeProfile:
    """Per layer: the fraction of neighbouring key pairs above the threshold (mergeable),
    and the share of slots to give each layer (1 - that fraction), for `plan_capacity(per_layer=...)`."""

    threshold: float
    mergeable: tuple[float, ...]

    @property
    def keep(self) -> tuple[float, ...]:
        return tuple(1.0 - f for f in self.mergeable)


def merge_profile(model: CachedDecoder, tokens, *, threshold: float = 0.9, chunk_size: int = 128) -> MergeProfile:
    """Mergeable fraction per layer: mean over rows, KV heads and neighbour pairs of
    [cos(k_i, k_{i+1}) > threshold], keys after RoPE as the cache holds them."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, length >= 2], got shape {tokens.shape}")
    padded, valid = pad_to_chunks(tokens, jnp.ones(tokens.shape, bool), chunk_size)
    policy = make("full", capacity=padded.shape[1])
    cache = model.cache_spec().init(policy, tokens.shape[0])
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, c: prefill(nnx.merge(graphdef, st), padded, valid, c, policy, jax.random.key(0), chunk_size=chunk_size))
    _, cache = run(state, cache)
    fractions = []
    for lc in cache.layers:
        order = jnp.argsort(jnp.where(lc.valid, lc.pos, jnp.iinfo(jnp.int32).max), axis=-1)
        k = jnp.take_along_axis(lc.k, order[..., None], 2)
        pair_ok = jnp.take_along_axis(lc.valid, order, 2)
        pair_ok = pair_ok[..., 1:] & pair_ok[..., :-1]
        similar = (cosine(k[..., 1:, :], k[..., :-1, :]) > threshold) & pair_ok
        fractions.append(float(similar.sum() / pair_ok.sum()))
    return MergeProfile(threshold, tuple(np.round(fractions, 6).tolist()))
