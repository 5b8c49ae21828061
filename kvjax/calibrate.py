"""Offline profiling on calibration text: statistics that configure a method once per model.

`merge_profile` is KVMerger's (arXiv 2407.08454, Sec. 3.1): key similarity between
neighbouring tokens is a property of the model, not of the data, so the
mergeable fraction of each layer is measured once and sets per-layer budgets.

`pod_blocks` is POD's (arXiv 2412.02252, Sec. 3): per KV head, consecutive
layers whose attention over distant tokens is similar (1 - Jensen-Shannon
divergence, base 2, so in [0, 1]) form a block that shares the lowest layer's
distant keys; greedy, bottom-up, a layer joins the open block while its
similarity to the block's first layer is >= delta (0.5). Attention is the mass
the last `queries` tokens give each key, summed over the query heads of the KV
group (our reading for GQA).

`format_shifts` / `narrowest_format` choose a slot storage format (`kvjax.quant`)
for `plan_capacity(kv_dtype="auto")`: the format with the fewest bytes per slot
whose full cache moves the per-token NLL of the calibration text by at most a
threshold (mean |delta NLL| in nats, against the model's own dtype).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.evaluate import stream_nll
from kvjax.policies import make
from kvjax.policies.full import Full
from kvjax.policies.merging import neighbour_cosine
from kvjax.inputs import token_batch
from kvjax.protocol import CachedDecoder
from kvjax.quant import FORMATS
from kvjax.run import pad_to_chunks, prefill
from kvjax.select import gather, position_order
from kvjax.sharding import mesh_context, on_model_mesh


def _calibration_tokens(model: CachedDecoder, tokens) -> jax.Array:
    """Checked [B, T] calibration ids (rectangular: every row is measured over the same positions)."""
    if isinstance(tokens, (list, tuple)) and len({len(row) for row in tokens}) > 1:
        raise ValueError("calibration rows must have equal lengths; cut them to the shortest")
    ids, _ = token_batch(tokens, vocab_size=model.vocab_size)
    if ids.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, length >= 2], got shape {ids.shape}")
    return jnp.asarray(ids)


def _prefilled(model: CachedDecoder, tokens, policy_for, chunk_size: int, impl: str):
    """The cache after a chunked prefill of `tokens` with `policy_for(padded length)` (attention by `impl`),
    on the model's mesh when its weights are sharded."""
    padded, valid = pad_to_chunks(tokens, jnp.ones(tokens.shape, bool), chunk_size)
    graphdef, state = nnx.split(model)
    cache, padded, valid = on_model_mesh(state, model.cache_spec().init(policy_for(padded.shape[1]), tokens.shape[0]), padded, valid)
    run = jax.jit(lambda st, c, x, m: prefill(nnx.merge(graphdef, st), x, m, c, jax.random.key(0), chunk_size=chunk_size, impl=impl))
    with mesh_context(state):
        return run(state, cache, padded, valid)[1]


@dataclasses.dataclass(frozen=True)
class MergeProfile:
    """Per layer: the fraction of neighbouring key pairs above the threshold (mergeable),
    and the share of slots to give each layer (1 - that fraction), for `plan_capacity(per_layer=...)`."""

    threshold: float
    mergeable: tuple[float, ...]

    @property
    def keep(self) -> tuple[float, ...]:
        return tuple(1.0 - f for f in self.mergeable)


def merge_profile(model: CachedDecoder, tokens, *, threshold: float = 0.9, chunk_size: int = 128, impl: str = "auto") -> MergeProfile:
    """Mergeable fraction per layer: mean over rows, KV heads and neighbour pairs of
    [cos(k_i, k_{i+1}) > threshold], keys after RoPE as the cache holds them."""
    tokens = _calibration_tokens(model, tokens)
    cache = _prefilled(model, tokens, lambda n: make("full", capacity=n), chunk_size, impl)
    fractions = []
    for lc in cache.layers:
        order = position_order(lc.pos, lc.valid)
        k, pair_ok = gather((lc.k, lc.valid), order)
        pair_ok = pair_ok[..., 1:] & pair_ok[..., :-1]
        similar = (neighbour_cosine(k) > threshold) & pair_ok
        fractions.append(float(similar.sum() / pair_ok.sum()))
    return MergeProfile(threshold, tuple(np.round(fractions, 6).tolist()))


@dataclasses.dataclass(frozen=True)
class _AttentionProbe(Full):
    """The full cache, scoring each key by the attention mass it gets from queries at positions >= `after`."""

    after: int = 0

    name = "attention_probe"

    def stat_weights(self, step):
        return (step.new_valid & (step.positions >= self.after)).astype(jnp.float32)

    def score(self, cand, step, layer):
        return cand.score + cand.mass


def attention_profile(model: CachedDecoder, tokens, *, queries: int = 64, chunk_size: int = 64, impl: str = "auto") -> np.ndarray:
    """[layers, batch, kv_heads, T]: attention mass of the last `queries` tokens on every key."""
    tokens = _calibration_tokens(model, tokens)
    t = tokens.shape[1]
    if not 0 < queries < t:
        raise ValueError(f"queries must be in 1..{t - 1} for {t} tokens, got {queries}")
    cache = _prefilled(model, tokens, lambda n: _AttentionProbe(capacity=n, after=t - queries), chunk_size, impl)
    out = []
    for lc in cache.layers:
        order = position_order(lc.pos, lc.valid)[..., :t]
        out.append(np.asarray(jnp.take_along_axis(lc.score, order, -1)))
    return np.stack(out)


def js_similarity(p: np.ndarray, q: np.ndarray) -> float:
    """1 - Jensen-Shannon divergence (base 2) of two distributions: 1 identical, 0 disjoint."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    kl = lambda a: float(np.sum(np.where(a > 0, a * np.log2(np.where(a > 0, a, 1) / np.where(m > 0, m, 1)), 0.0)))  # noqa: E731
    return 1.0 - (kl(p) + kl(q)) / 2


def group_layers(distributions: np.ndarray, delta: float = 0.5) -> tuple[tuple[int, ...], ...]:
    """Greedy consecutive blocks per head from [layers, heads, keys] distributions: owners[l][h]."""
    layers, heads, _ = distributions.shape
    owners = [[0] * heads for _ in range(layers)]
    for h in range(heads):
        start = 0
        for layer in range(1, layers):
            if js_similarity(distributions[start, h], distributions[layer, h]) < delta:
                start = layer
            owners[layer][h] = start
    return tuple(tuple(row) for row in owners)


def pod_blocks(model: CachedDecoder, tokens, *, delta: float = 0.5, sinks: int = 16, window: int = 64,
               queries: int = 64, chunk_size: int = 64, impl: str = "auto") -> tuple[tuple[int, ...], ...]:
    """POD's layer blocks for `kvjax.policies.make("pod", owners=...)`, from calibration tokens.

    Distant keys are those after the first `sinks` and before the last `queries + window` positions.
    """
    mass = attention_profile(model, tokens, queries=queries, chunk_size=chunk_size, impl=impl)  # [L, B, H, T]
    t = mass.shape[-1]
    if t - queries - window <= sinks:
        raise ValueError(f"{t} calibration tokens leave no distant tokens after sinks={sinks}, window={window}, queries={queries}")
    distant = mass[..., sinks : t - queries - window].sum(1) + 1e-12  # summed over rows: [L, H, distant keys]
    return group_layers(distant, delta)


def save_blocks(path, owners) -> None:
    pathlib.Path(path).write_text(json.dumps({"owners": [list(row) for row in owners]}))


def load_blocks(path) -> tuple[tuple[int, ...], ...]:
    try:
        data = json.loads(pathlib.Path(path).read_text())
        return tuple(tuple(int(o) for o in row) for row in data["owners"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a POD blocks file (expected {{'owners': [[...], ...]}}): {err}") from err


def format_shifts(model: CachedDecoder, tokens, *, formats=("bfloat16", "int8", "fp8", "int4", "int2"), chunk_size: int = 64,
                  impl: str = "auto") -> dict[str, float]:
    """Mean |delta NLL| per token (nats) of the full cache stored in each format, against the model's dtype.
    A chunk's tokens see each other before they are stored, so only what is read from the cache
    (tokens of earlier chunks) is quantized: keep `chunk_size` well below the text's length."""
    tokens = _calibration_tokens(model, tokens)
    capacity = -(-tokens.shape[1] // 32) * 32  # every token kept, in whole KIVI groups
    nll = lambda kv: np.asarray(stream_nll(model, tokens, policy=make("full", capacity=capacity, kv_dtype=kv),  # noqa: E731
                                           chunk_size=chunk_size, impl=impl))
    reference = nll(None)
    return {f: float(np.nanmean(np.abs(nll(f) - reference))) for f in formats}


def narrowest_format(shifts: dict[str, float], max_shift: float, own_dtype: str, head_dim: int) -> str:
    """The format with the fewest bytes per slot (of `head_dim`, scales included) whose shift is at
    most `max_shift` (equal bytes: the smaller shift); the model's own dtype when none is."""
    fits = [f for f, shift in shifts.items() if shift <= max_shift]
    if not fits:
        return own_dtype
    return min(fits, key=lambda f: (FORMATS[f].bytes_per_slot(head_dim), shifts[f]))
