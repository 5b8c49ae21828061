"""DMC, Dynamic Memory Compression (Nawrot et al., arXiv 2403.09636): learned append-or-merge per head.

Every (batch row, KV head) decides for each new token t whether to append it
as a new slot or merge it into the head's last (open) slot, from its own key
and query (Sec. 3.1-3.2, Eq. 4-6; constants from the authors' inference code):

    alpha_t = 1[k_t[d-1] - 5 > 0]                  (merge; the first token appends)
    omega_t = sigmoid(mean_g q_t[d-1] + 5) + eps   (importance, averaged over the query heads of the group)

and dimension d-1 of q and k is excluded from attention (zeroed before RoPE).
The open slot is the omega-weighted mean of its members' pre-RoPE keys and
values, rotated at the newest member's position: with `merge_window=12` (the
authors' code) of at most the 12 newest members (older ones are dropped), with
`merge_window=None` of all of them (the paper's running mean). A query sees the
closed slots and the open slot including itself.

Under a predefined capacity each head fills its own slots (the cache is a
prefix of valid slots per head, so the attention kernels skip the rest); a head
whose slots are all used merges whatever alpha says (forced merge), so memory
never exceeds the capacity. `score` holds how many tokens were merged into each
slot (they sum to the tokens seen).

Tokens are consumed one at a time, also inside a prefill chunk (as the
authors' inference does); `kvjax.retrofit` is the full-sequence training path,
equal to this one for hard decisions when no head is full.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from einops import reduce

from kvjax import select
from kvjax.cache import LayerCache
from kvjax.policies.base import Policy, check_int
from kvjax.select import trailing

OFFSET = 5.0  # c in alpha's logit k[d-1] - c and in omega = sigmoid(q[d-1] + c) (dmc_init_val)
OMEGA_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # added to omega, as in the authors' code
MERGE_WINDOW = 12  # members averaged per slot in the authors' code; inference and retrofit share it


def decision_inputs(
    q: Float[Array, "B S Hq D"], k: Float[Array, "B S H D"]
) -> tuple[Float[Array, "B S H"], Float[Array, "B S H"]]:
    """(alpha logit k[d-1] - 5, omega) per token and KV head, in f32."""
    logit = k[..., -1].astype(jnp.float32) - OFFSET
    q_last = reduce(q[..., -1].astype(jnp.float32), "b s (h g) -> b s h", "mean", h=k.shape[2])
    return logit, jax.nn.sigmoid(q_last + OFFSET) + OMEGA_EPS


def strip_decision_dim(x: Float[Array, "... D"], factor: float | Array = 0.0) -> Float[Array, "... D"]:
    """x with its last dimension times `factor` (0: excluded from attention; stage one ramps it down)."""
    return x.at[..., -1].multiply(jnp.asarray(factor, x.dtype))


@struct.dataclass
class DMCState:
    """One layer's open-slot accumulators, per (batch row, KV head).

    k_acc, v_acc, w_acc: omega-weighted pre-RoPE contributions (omega*k, omega*v, omega),
        a ring of the last W tokens (slot t mod W) with a merge window of W, or
        one running sum (W = 1) without.
    count: tokens in the open slot.
    """

    k_acc: Float[Array, "B H W D"]
    v_acc: Float[Array, "B H W D"]
    w_acc: Float[Array, "B H W"]
    count: Int[Array, "B H"]

    def update(self, merge: Bool[Array, "B H"], omega, k, v, pos: Int[Array, " B"], windowed: bool) -> "DMCState":
        """Add token (k, v) [B, H, D] with weight omega [B, H]: to the open slot, or as a new one."""
        contrib = (omega[..., None] * k, omega[..., None] * v, omega)
        accs = (self.k_acc, self.v_acc, self.w_acc)
        if windowed:  # write at ring slot t mod W; which entries are members is `count`'s business (`mean`)
            at = jnp.arange(self.w_acc.shape[-1]) == (pos % self.w_acc.shape[-1])[:, None, None]  # [B, 1, W]
            acc = [jnp.where(trailing(at, a), c[:, :, None], a) for a, c in zip(accs, contrib)]
        else:  # one running sum, restarted by an append
            acc = [jnp.where(trailing(merge[:, :, None], a), a, 0.0) + c[:, :, None] for a, c in zip(accs, contrib)]
        return DMCState(*acc, count=jnp.where(merge, self.count + 1, 1))

    def mean(self, pos: Int[Array, " B"], windowed: bool) -> tuple[Float[Array, "B H D"], Float[Array, "B H D"]]:
        """The open slot's (k, v): weighted mean of its members (the newest W with a window)."""
        w = self.w_acc.shape[-1]
        if windowed:
            age = (pos[:, None, None] - jnp.arange(w)) % w  # 0 = the token just added
            member = age < jnp.minimum(self.count, w)[..., None]
        else:
            member = jnp.ones(self.w_acc.shape, bool)
        wsum = jnp.where(member, self.w_acc, 0.0).sum(-1)[..., None]
        pick = lambda a: jnp.where(member[..., None], a, 0.0).sum(2) / wsum  # noqa: E731
        return pick(self.k_acc), pick(self.v_acc)


@dataclasses.dataclass(frozen=True)
class DMC(Policy):
    """Keeps: per head, merged slots appended or overwritten by the learned decisions (see module doc)."""

    capacity: int
    merge_window: int | None = MERGE_WINDOW  # members of a slot kept in its mean (authors' code); None: all (paper)

    name = "dmc"

    def __post_init__(self):
        if self.merge_window is not None and (not isinstance(self.merge_window, int) or self.merge_window < 1):
            raise ValueError(f"dmc: merge_window must be a positive int or None, got {self.merge_window!r}")
        check_int(self, "capacity", self.capacity, 1)

    @property
    def windowed(self) -> bool:
        return self.merge_window is not None

    def resolve(self, spec):
        if spec.sliding_windows and any(spec.sliding_windows):
            raise ValueError(f"{self.name}: models with sliding-window layers are not supported")
        if not spec.dmc_decisions:
            warnings.warn(
                "dmc: this model's decision dimension (q/k dimension d-1) was never trained, so its merges are "
                "arbitrary; retrofit it first (kvjax.retrofit, see experiments/dmc_replication.py), which marks "
                "the config with dmc_decisions=True", stacklevel=4,
            )
        return super().resolve(spec)

    def init_state(self, spec, layer: int, batch: int) -> DMCState:
        w = self.merge_window or 1
        return DMCState(
            k_acc=jnp.zeros((batch, spec.kv_heads, w, spec.head_dim), jnp.float32),
            v_acc=jnp.zeros((batch, spec.kv_heads, w, spec.head_dim), jnp.float32),
            w_acc=jnp.zeros((batch, spec.kv_heads, w), jnp.float32),
            count=jnp.zeros((batch, spec.kv_heads), jnp.int32),
        )

    def update(self, cache, layer, q, k, v, step, attn):
        """Consume the chunk token by token: decide, update the open slot, attend, write the slot."""
        logit, omega = decision_inputs(q, k)
        q, k = strip_decision_dim(q), strip_decision_dim(k)
        c = cache.layers[layer].slots

        def token(carry, xs):
            lc, st = carry
            q_t, k_t, v_t, logit_t, omega_t, pos_t, valid_t = xs
            length = lc.valid.sum(-1)  # [B, H]: a head's slots are a valid prefix
            merge = ((logit_t > 0) & (length > 0)) | (length >= c)  # the first token appends; a full head merges
            new_st = st.update(merge, omega_t, k_t.astype(jnp.float32), v_t.astype(jnp.float32), pos_t, self.windowed)
            k_mean, v_mean = new_st.mean(pos_t, self.windowed)
            k_slot = attn.rope(k_mean, jnp.broadcast_to(pos_t[:, None], length.shape)).astype(lc.k.dtype)
            v_slot = v_mean.astype(lc.v.dtype)
            index = jnp.where(merge, length - 1, length)
            others = lc.valid & (jnp.arange(c) != index[..., None])  # the slot being written is the "new" key
            one = step.replace(positions=pos_t[:, None], new_valid=valid_t[:, None])
            q_rot = attn.rope(q_t, jnp.broadcast_to(pos_t[:, None], q_t.shape[:2]))[:, None]
            out, _ = attn(q_rot, lc.k, lc.v, others, k_slot[:, None], v_slot[:, None], one, cache_pos=lc.pos)
            target = select.after(jnp.where(valid_t[:, None], index, c), out, c)  # c = out of range: padding writes nothing
            lc = LayerCache(
                k=select.write_slot(lc.k, target, k_slot),
                v=select.write_slot(lc.v, target, v_slot),
                pos=select.write_slot(lc.pos, target, jnp.broadcast_to(pos_t[:, None], length.shape)),
                valid=select.write_slot(lc.valid, target, jnp.ones_like(merge)),
                score=select.write_slot(lc.score, target, new_st.count.astype(jnp.float32)),
            )
            st = jax.tree.map(lambda new, old: jnp.where(trailing(valid_t, old), new, old), new_st, st)
            return (lc, st), out[:, 0]

        xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, logit, omega, step.positions, step.new_valid))
        (lc, st), out = jax.lax.scan(token, (cache.layers[layer], cache.state[layer]), xs)
        return jnp.moveaxis(out, 0, 1), cache.replace_layer(layer, lc).replace_state(layer, st)
