"""One layer's attention over its fixed-capacity cache, then the policy update.

Models call `attend` from each attention layer with pre-RoPE queries and keys;
it rotates them as the policy's position convention requires, attends over
(cache + chunk), lets the policy score the candidates and keeps the best in
place. The cache goes in and comes out, so under `jax.jit` with the cache
donated a decode step writes one slot per (row, KV head) in place.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from kvjax import select
from kvjax.attention import attention
from kvjax.cache import EMPTY_POS, KVCache, LayerCache
from kvjax.policies.base import Candidates, Policy, Step
from kvjax.rope import Rope


def _check_shapes(cache: KVCache, layer: int, q, k, v, step: Step) -> None:
    b, s = step.positions.shape
    if not 0 <= layer < cache.num_layers:
        raise ValueError(f"layer={layer} is out of range for a cache of {cache.num_layers} layers")
    want_kv = (b, s, cache.kv_heads, cache.head_dim)
    for name, x in (("k", k), ("v", v)):
        if x.shape != want_kv:
            raise ValueError(f"attend: {name} has shape {x.shape}, expected [batch, chunk, kv_heads, head_dim] = {want_kv}")
    if q.ndim != 4 or q.shape[:2] != (b, s) or q.shape[3] != cache.head_dim or q.shape[2] % cache.kv_heads:
        raise ValueError(
            f"attend: q has shape {q.shape}, expected [batch={b}, chunk={s}, a multiple of "
            f"kv_heads={cache.kv_heads}, head_dim={cache.head_dim}]"
        )
    want = cache.layers[layer].k.dtype
    if k.dtype != want or v.dtype != want:
        raise TypeError(f"attend: k/v dtype {k.dtype}/{v.dtype} differs from the cache dtype {want}")


def attend(
    cache: KVCache,
    layer: int,
    q: Float[Array, "B S Hq D"],
    k: Float[Array, "B S H D"],
    v: Float[Array, "B S H D"],
    *,
    policy: Policy,
    step: Step,
    rope: Rope,
    scale: float,
    softcap: float | None = None,
) -> tuple[Float[Array, "B S Hq D"], KVCache]:
    """Attend chunk queries to layer `layer` of the cache, then compress the chunk in.

    Returns the attention output and the cache with that layer updated (the
    caller advances `cache.seen` once all layers are done).
    """
    _check_shapes(cache, layer, q, k, v, step)
    policy = policy.for_layer(layer)
    if policy.owns_update:  # learned compression (DMC): no candidates to score and rank
        return policy.attend_layer(cache, layer, q, k, v, step=step, rope=rope, scale=scale, softcap=softcap)
    b, s, h, _ = k.shape
    lc = cache.layers[layer]
    k_slots, v_slots, pos, valid, score = lc.k, lc.v, lc.pos, lc.valid, lc.score

    cache_rot_pos, chunk_pos = policy.key_positions(pos, valid, step)
    q = rope(q, chunk_pos[:, :, None])
    k_rot = rope(k, chunk_pos[:, :, None])
    k_attend = k_slots if cache_rot_pos is None else rope(k_slots, cache_rot_pos)
    k_store = k if policy.rotate_at_cache_position else k_rot

    keys, values, visible, key_pos = k_attend, v_slots, valid, pos
    if policy.shares_keys:  # POD: the distant ring, keys from each head's block owner
        dk, dv, dvalid, dpos = policy.distant_view(cache.state, layer)
        keys, values = jnp.concatenate([keys, dk], 2), jnp.concatenate([values, dv], 2)
        visible, key_pos = jnp.concatenate([visible, dvalid], 2), jnp.concatenate([key_pos, dpos], 2)
    out, mass = attention(
        q, keys, values, visible, k_rot, v, step.new_valid,
        scale=scale, softcap=softcap, stat_weights=policy.stat_weights(step), impl=step.impl,
        max_distance=policy.max_distance, cache_pos=key_pos, q_pos=step.positions,
    )

    ring_mass = None
    if policy.shares_keys and mass is not None:  # mass over (slots, ring, chunk): the ring's goes to the ring
        c, r = lc.slots, dk.shape[2]
        ring_mass = jnp.concatenate([mass[..., c : c + r], mass[..., :c], mass[..., c + r :]], -1)
        mass = jnp.concatenate([mass[..., :c], mass[..., c + r :]], -1)

    # Candidates: the layer's slots, then the chunk's tokens, per KV head.
    new_k = k_store.transpose(0, 2, 1, 3)  # [B, H, S, D]
    new_v = v.transpose(0, 2, 1, 3)
    new_pos = jnp.broadcast_to(step.positions[:, None, :], (b, h, s))
    new_valid = jnp.broadcast_to(step.new_valid[:, None, :], (b, h, s))
    c = lc.slots
    cand = Candidates(
        score=jnp.concatenate([score, jnp.zeros((b, h, s), score.dtype)], -1),
        mass=mass,
        pos=jnp.concatenate([pos, new_pos], -1),
        valid=jnp.concatenate([valid, new_valid], -1),
        k_new=new_k,
        num_cache=c,
        group=q.shape[2] // h,
    )
    new_score = policy.score(cand, step, layer).astype(jnp.float32)
    protected = policy.protected(cand.pos, cand.valid, step)
    rank = select.rank(new_score, cand.valid, protected)
    if policy.shares_keys:  # tokens leaving the proximal window may enter the distant ring
        ring = policy.update(cache.state, layer, jnp.concatenate([k_slots, new_k], 2), jnp.concatenate([v_slots, new_v], 2),
                             cand.pos, cand.valid & ~protected, ring_mass, step)
        cache = cache.replace_state(layer, ring)

    if policy.merges:  # merging policies rewrite slots, so they see every candidate
        fields = dict(k=jnp.concatenate([k_slots, new_k], 2), v=jnp.concatenate([v_slots, new_v], 2),
                      pos=cand.pos, valid=cand.valid, score=new_score)
        kept = policy.merge(fields, cand, step, layer, c)
        kept["pos"] = jnp.where(kept["valid"], kept["pos"], EMPTY_POS)
        lc = LayerCache(**kept)
    elif s == 1:  # decode: evict one candidate, write the new token over it in place
        drop = select.evict_index(rank, cand.pos)
        target = jnp.where((drop < c) & step.new_valid, drop, c)  # c = out of range: no write
        lc = LayerCache(
            k=select.write_slot(k_slots, target, new_k[:, :, 0]),
            v=select.write_slot(v_slots, target, new_v[:, :, 0]),
            pos=select.write_slot(pos, target, new_pos[:, :, 0]),
            valid=select.write_slot(valid, target, new_valid[:, :, 0]),
            score=select.write_slot(new_score[..., :c], target, new_score[..., c]),
        )
    else:  # prefill chunk: sort all candidates, gather the best into the layer
        kept = select.select_chunk(
            dict(
                k=jnp.concatenate([k_slots, new_k], 2),
                v=jnp.concatenate([v_slots, new_v], 2),
                pos=cand.pos,
                valid=cand.valid,
                score=new_score,
            ),
            rank, c,
        )
        kept["pos"] = jnp.where(kept["valid"], kept["pos"], EMPTY_POS)
        lc = LayerCache(**kept)
    return out, cache.replace_layer(layer, lc)
