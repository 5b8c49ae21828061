"""Training-time attention for retrofitting a model to a cache method: DMC (arXiv 2403.09636, Sec. 3.3,
the training relaxation) and POD's post-training (arXiv 2412.02252, Sec. 3.3; `pod_attention`).

The full-sequence, differentiable counterpart of `kvjax.policies.dmc`:

- decisions alpha_t = sigmoid((k_t[d-1] - 5 + G1 - G2) / tau) with Gumbel
  noise G (tau = 0.1) while training, or hard 1[k_t[d-1] > 5] (straight-through);
  the first token never merges;
- partial accumulation: position i holds the relaxed running mean of its
  group, x_i = sum_j c_ij w_j x_j / sum_j c_ij w_j over the last `window`
  tokens, c_ij = prod_{m=j+1..i} alpha_m, in f32 (Eq. for keys and values, pre-RoPE);
- intermediate-state mask: query i sees key j < i with the additive bias
  log(1 - alpha_{j+1}) (a state superseded by the next token's merge), and
  always its own state (the diagonal);
- the one-sided compression loss max(0, (1 - 1/CR) - mean alpha) with a
  linear CR ramp, and the stage-one zero-out of the repurposed dimension.

With hard decisions and no full head this is exactly the inference cache's
attention (tested against `kvjax.policies.dmc`). The attention functions plug
into a model's full-sequence forward: `fn(q, k, v, *, rope, scale, layer, key)`
-> (out, per-layer aux).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from kvjax import attention as attention_lib
from kvjax.policies.dmc import MERGE_WINDOW, decision_inputs, strip_decision_dim
from kvjax.policies.pod import train_attention
from kvjax.rope import Rope

TEMPERATURE = 0.1  # tau of the Gumbel-sigmoid (dmc_temp)


def causal_attention(q, k, v, *, rope: Rope, scale: float, bias=None) -> Float[Array, "B T Hq D"]:
    """`kvjax.attention.causal_attention` of pre-RoPE q, k rotated at positions 0..T-1 (plus a bias [B, H, T, T])."""
    pos = jnp.arange(q.shape[1])[None, :, None]
    return attention_lib.causal_attention(rope(q, pos), rope(k, pos), v, scale=scale, bias=bias)


def partial_states(x: Float[Array, "B T H D"], alpha: Float[Array, "B T H"], omega: Float[Array, "B T H"], window: int | None):
    """Each position's relaxed open-slot mean over its group (the last `window` members, or all), in f32."""
    x, alpha, omega = x.astype(jnp.float32), alpha.astype(jnp.float32), omega.astype(jnp.float32)
    wx = omega[..., None] * x
    if window is None:  # running sums s_i = alpha_i s_{i-1} + w_i x_i: an associative scan over (alpha, w x, w)
        def combine(earlier, later):
            a1, n1, d1 = earlier
            a2, n2, d2 = later
            return a1 * a2, a2[..., None] * n1 + n2, a2 * d1 + d2

        _, num, den = jax.lax.associative_scan(combine, (alpha, wx, omega), axis=1)
        return num / den[..., None]
    shift = lambda y, o: jnp.pad(y, [(0, 0), (o, 0)] + [(0, 0)] * (y.ndim - 2))[:, : y.shape[1]]  # noqa: E731
    num, den, c = wx, omega, jnp.ones_like(alpha)
    for o in range(1, window):
        c = c * shift(alpha, o - 1)  # c_{i, i-o} = prod_{m=i-o+1..i} alpha_m
        num = num + c[..., None] * shift(wx, o)
        den = den + c * shift(omega, o)
    return num / den[..., None]


@dataclasses.dataclass(frozen=True)
class DMCTraining:
    """Static settings of the retrofit attention (hashable: a jit static argument).

    window: members averaged per slot (the authors' 12) or None (running mean), as `DMC.merge_window`.
    hard: straight-through hard decisions (evaluation; equals inference), else Gumbel-sigmoid.
    """

    window: int | None = MERGE_WINDOW
    temperature: float = TEMPERATURE
    hard: bool = False

    def attention(self, q, k, v, *, rope: Rope, scale: float, layer: int, key: jax.Array):
        """DMC attention of a whole sequence; aux = straight-through mean alpha per row [B]."""
        logit, omega = decision_inputs(q, k)
        logit = logit.at[:, 0].set(-jnp.inf)  # the first token appends
        p = jax.nn.sigmoid(logit)
        hard = (logit > 0).astype(jnp.float32)
        alpha_ste = hard + p - jax.lax.stop_gradient(p)
        if self.hard:
            alpha, keep_log = alpha_ste, jnp.where(hard > 0, -jnp.inf, 0.0)
        else:
            z = (logit + jax.random.logistic(jax.random.fold_in(key, layer), logit.shape)) / self.temperature
            alpha, keep_log = jax.nn.sigmoid(z), jax.nn.log_sigmoid(-z)  # log(1 - alpha), stable
        q, k = strip_decision_dim(q), strip_decision_dim(k)
        kv = partial_states(jnp.concatenate([k, v], -1), alpha, omega, self.window)  # one pass for both
        ks, vs = kv[..., : k.shape[-1]].astype(k.dtype), kv[..., k.shape[-1] :].astype(v.dtype)
        # key j is superseded for later queries when token j+1 merges into it
        nxt = jnp.concatenate([keep_log[:, 1:], jnp.zeros_like(keep_log[:, :1])], 1).transpose(0, 2, 1)  # [B, H, T]
        t = q.shape[1]
        bias = jnp.where(jnp.eye(t, dtype=bool), 0.0, nxt[:, :, None, :])
        return causal_attention(q, ks, vs, rope=rope, scale=scale, bias=bias), alpha_ste.mean((1, 2))


def zero_out_attention(factor):
    """Stage one: vanilla attention with the repurposed dimension scaled by `factor` (ramped to 0)."""

    def attention(q, k, v, *, rope: Rope, scale: float, layer: int, key: jax.Array):
        return causal_attention(strip_decision_dim(q, factor), strip_decision_dim(k, factor), v, rope=rope, scale=scale), None

    return attention


def pod_attention(owners, *, sinks: int, window: int):
    """POD's post-training attention (arXiv 2412.02252, Sec. 3.3): every layer attends with
    `kvjax.policies.pod.train_attention`, proximal keys its own, distant keys those of its block's owner
    (`owners[l][h]`, from `kvjax.calibrate.pod_blocks`). Layers run in order and an owner is never
    later than the layers it serves, so each layer's rotated keys are kept for the layers after it
    (cleared at layer 0, so every forward starts afresh)."""
    keys = {}

    def attention(q, k, v, *, rope: Rope, scale: float, layer: int, key: jax.Array):
        if layer == 0:
            keys.clear()
        pos = jnp.arange(q.shape[1])[None, :, None]
        keys[layer] = rope(k, pos)
        k_owner = jnp.stack([keys[owners[layer][h]][:, :, h] for h in range(k.shape[2])], 2)
        return train_attention(rope(q, pos), keys[layer], k_owner, v, sinks=sinks, window=window, scale=scale), None

    return attention


def vanilla_attention(q, k, v, *, rope: Rope, scale: float, layer: int, key: jax.Array):
    """Plain causal attention (pretraining, and the untouched model)."""
    return causal_attention(q, k, v, rope=rope, scale=scale), None


def target_cr(step, steps: int, cr: float) -> Float[Array, ""]:
    """Linear ramp CR_t = 1 + (CR - 1) min(1, step / steps)."""
    return 1.0 + (cr - 1.0) * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / max(steps, 1))


def zero_out_factor(step, steps: int) -> Float[Array, ""]:
    """Stage one's factor max(0, 1 - step / (0.8 steps)) on the repurposed q/k dimension."""
    return jnp.maximum(0.0, 1.0 - jnp.asarray(step, jnp.float32) / (0.8 * max(steps, 1)))


def compression_loss(mean_alpha: Float[Array, "L B"], cr: Float[Array, ""]) -> Float[Array, ""]:
    """mean_B max(0, (1 - 1/CR) - alpha_bar), alpha_bar the mean over layers (one-sided: only too little merging)."""
    return jax.nn.relu((1.0 - 1.0 / cr) - mean_alpha.mean(0)).mean()


def achieved_cr(mean_alpha: Float[Array, "L B"]) -> Float[Array, ""]:
    """1 / (1 - mean alpha), the compression ratio the decisions give."""
    return 1.0 / jnp.maximum(1.0 - mean_alpha.mean(), 1e-6)


# ----------------------------------------------------------------------------- losses for kvjax.train


def next_token_loss(logits, batch) -> jax.Array:
    """Mean cross-entropy of batch[:, 1:] under logits of batch[:, :-1], in f32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[:, 1:]).mean()


def language_model_loss(attention_fn=vanilla_attention):
    """Next-token cross-entropy of `model.full_sequence` with the given attention (pretraining)."""

    def loss(model, batch, step, key):
        logits, _ = model.full_sequence(batch[:, :-1], attention_fn, key)
        return next_token_loss(logits, batch), {}

    return loss


def zero_out_loss(steps: int):
    """Stage one: cross-entropy while the repurposed q/k dimension is ramped to zero over 0.8 `steps`."""

    def loss(model, batch, step, key):
        factor = zero_out_factor(step, steps)
        logits, _ = model.full_sequence(batch[:, :-1], zero_out_attention(factor), key)
        return next_token_loss(logits, batch), {"zero_out": factor}

    return loss


def dmc_loss(cr: float, ramp_steps: int = 0, *, window: int | None = MERGE_WINDOW, weight: float = 1.0):
    """Stages two and three: cross-entropy + weight * compression loss, the target CR ramped linearly
    over `ramp_steps` (0: fixed at `cr`, the fine-tune stage); logs the achieved CR."""
    attention = DMCTraining(window=window).attention

    def loss(model, batch, step, key):
        logits, aux = model.full_sequence(batch[:, :-1], attention, key)
        mean_alpha = jnp.stack(aux)  # [L, B]
        target = target_cr(step, ramp_steps, cr) if ramp_steps else jnp.float32(cr)
        ce = next_token_loss(logits, batch)
        return ce + weight * compression_loss(mean_alpha, target), {"ce": ce, "cr": achieved_cr(mean_alpha), "target_cr": target}

    return loss
