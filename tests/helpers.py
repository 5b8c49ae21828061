"""Shared test machinery: a layer-level runner and float64 numpy references.

The references are written from the papers' formulas (cited in each policy's
docstring), independently of kvjax's vectorised code: explicit Python loops over tokens,
heads and candidates, in float64.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kvjax
from kvjax.run import chunked, make_step

ROPE = kvjax.Rope(theta=10_000.0)


# ----------------------------------------------------------------------------- memory


def prefill_memory(model, policy, lengths, *, chunk: int):
    """(scratch bytes, output bytes) of the compiled chunked prefill for each prompt length,
    and the jitted program itself (state, tokens) -> (last hidden, cache)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        m = nnx.merge(graphdef, state)
        cache = m.cache_spec().init(policy, tokens.shape[0])
        return kvjax.prefill(m, tokens, jnp.ones_like(tokens, bool), cache, jax.random.key(0), chunk_size=chunk)

    stats = [run.lower(state, jnp.zeros((1, t), jnp.int32)).compile().memory_analysis() for t in lengths]
    return [(m.temp_size_in_bytes, m.output_size_in_bytes) for m in stats], functools.partial(run, state)


@contextlib.contextmanager
def compiles_of(fun_name: str = "jit(_generate)"):
    """The XLA compilations of `fun_name` while the block runs (a list that fills up)."""
    events = []

    def listener(event, duration, **kw):
        if kw.get("fun_name") == fun_name and event.endswith("backend_compile_duration"):
            events.append(kw)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ----------------------------------------------------------------------------- models


def decision_dimension_zeroed(model):
    """A copy whose q/k projections give 0 in each head's last dimension (DMC's decision dimension)."""
    model = nnx.clone(model)
    model.cfg = dataclasses.replace(model.cfg, dmc_decisions=True)  # decided: never merge
    hd = model.cfg.head_dim
    for block in model.layers:
        for proj in (block.self_attn.q_proj, block.self_attn.k_proj):
            proj.kernel[...] = proj.kernel[...].at[:, hd - 1 :: hd].set(0.0)
    return model


def first_layers(model, n: int):
    """A copy keeping the first `n` decoder layers (real weights and shapes, a fraction of the compile
    time): for properties that hold for any weights, such as two code paths giving the same tokens."""
    model = nnx.clone(model)
    model.layers = nnx.List(list(model.layers)[:n])
    model.cfg = dataclasses.replace(model.cfg, num_layers=n)
    return model


# ----------------------------------------------------------------------------- runner


@functools.partial(jax.jit, static_argnames=("policy", "chunk"))
def run_layers(policy, q, k, v, valid, key, *, chunk):
    """Feed [L, B, T, heads, D] pre-RoPE q/k/v through `attend`, chunk by chunk.

    Returns (outputs [L, B, T, Hq, D], final cache, per-chunk caches stacked).
    """
    n_layers, b, t, hq, d = q.shape
    h = k.shape[3]
    cache = kvjax.CacheSpec(num_layers=n_layers, kv_heads=h, head_dim=d, dmc_decisions=True).init(policy, b)  # q/k are the decisions
    keys = jax.random.split(key, t // chunk)

    def body(cache, xs):
        qc, kc, vc, val, key = xs  # qc: [L, B, S, Hq, D]
        step = make_step(cache, val, key, prefill=chunk > 1)
        outs = []
        for layer in range(n_layers):
            out, cache = kvjax.attend(cache, layer, qc[layer], kc[layer], vc[layer], step=step, rope=ROPE, scale=d**-0.5)
            outs.append(out)
        cache = cache.replace(seen=step.seen_after)
        return cache, (jnp.stack(outs), cache)

    def split(x):  # [L, B, T, ...] -> [n, L, B, S, ...]
        return jnp.moveaxis(x.reshape(n_layers, b, t // chunk, chunk, *x.shape[3:]), 2, 0)

    cache, (outs, history) = jax.lax.scan(body, cache, (split(q), split(k), split(v), chunked(valid, chunk), keys))
    outs = jnp.moveaxis(outs, 0, 2).reshape(n_layers, b, t, hq, d)
    return outs, cache, history


def random_qkv(seed, *, layers=1, batch=1, length=16, q_heads=4, kv_heads=2, head_dim=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(layers, batch, length, q_heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(layers, batch, length, kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(layers, batch, length, kv_heads, head_dim)).astype(np.float32)
    return q, k, v


# ----------------------------------------------------------------------------- float64 references


def np_rope(x, pos, theta=10_000.0):
    """Half-split RoPE of vectors x [..., D] at integer positions pos [...] in float64."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.asarray(pos, np.float64)[..., None] * inv
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)], -1)


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def full_attention(q, k, v):
    """Causal attention, one sequence: q [T, Hq, D], k/v [T, H, D] (pre-RoPE)."""
    t, hq, d = q.shape
    g = hq // k.shape[1]
    qr, kr = np_rope(q, np.arange(t)[:, None]), np_rope(k, np.arange(t)[:, None])
    out = np.zeros((t, hq, d))
    for i in range(t):
        for head in range(hq):
            p = np_softmax(kr[: i + 1, head // g] @ qr[i, head] / np.sqrt(d))
            out[i, head] = p @ np.asarray(v, np.float64)[: i + 1, head // g]
    return out


def stream_by_score(q, k, v, capacity, *, window, score_fn, accumulate, share_heads=False):
    """Token-by-token eviction (chunk size 1) for one sequence, per KV head.

    Each step the current token joins the candidates (cache + itself) and
    attends over them; `score_fn(p_group)` gives the mass per candidate from
    the group's attention rows [G, n]; with `accumulate` the mass is added to
    the stored score (H2O), else it replaces it (TOVA). With `share_heads` the
    scores are averaged over all KV heads (TOVA's layer-level decision).
    If more than `capacity` candidates remain, the lowest-score candidate
    outside the last `window` tokens is evicted (oldest first on ties).
    Returns (kept positions per head, their scores per head).
    """
    t, hq, d = q.shape
    h = k.shape[1]
    g = hq // h
    kr = np_rope(k, np.arange(t)[:, None])
    qr = np_rope(q, np.arange(t)[:, None])
    kept = [[] for _ in range(h)]
    scores = [dict() for _ in range(h)]
    for i in range(t):
        masses = []
        for head in range(h):
            cand = kept[head] + [i]
            logits = np.stack([kr[cand, head] @ qr[i, head * g + j] / np.sqrt(d) for j in range(g)])
            masses.append(dict(zip(cand, score_fn(np_softmax(logits)))))
        if share_heads:
            masses = [{j: np.mean([m[j] for m in masses]) for j in masses[0]}] * h
        for head in range(h):
            cand = kept[head] + [i]
            for j in cand:
                scores[head][j] = (scores[head].get(j, 0.0) if accumulate else 0.0) + masses[head][j]
            if len(cand) > capacity:
                evictable = [j for j in cand if j < i + 1 - window]
                drop = min(evictable, key=lambda j: (scores[head][j], j))
                cand.remove(drop)
            kept[head] = cand
    return [sorted(x) for x in kept], [{j: s[j] for j in x} for x, s in zip(kept, scores)]


def snapkv_keep(q, k, capacity, window, kernel):
    """SnapKV's prompt selection per KV head (kvpress scoring), whole prompt at once."""
    t, hq, d = q.shape
    h = k.shape[1]
    g = hq // h
    qr, kr = np_rope(q, np.arange(t)[:, None]), np_rope(k, np.arange(t)[:, None])
    kept = []
    for head in range(h):
        votes = np.zeros(t - window)
        for j in range(g):
            for i in range(t - window, t):
                p = np_softmax(kr[: i + 1, head] @ qr[i, head * g + j] / np.sqrt(d))
                votes += p[: t - window] / (window * g)
        padded = np.concatenate([np.zeros(kernel // 2), votes, np.zeros(kernel // 2)])
        pooled = np.array([padded[j : j + kernel].sum() / kernel for j in range(t - window)])
        best = sorted(range(t - window), key=lambda j: (-pooled[j], -j))[: capacity - window]
        kept.append(sorted(best + list(range(t - window, t))))
    return kept
