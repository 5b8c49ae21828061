"""Llama-family decoder in Flax NNX (RMSNorm, RoPE, GQA, SwiGLU).

Family differences are configuration: q/k/v bias (Qwen2), per-head q/k RMSNorm
(Qwen3, Gemma 3), RoPE layout and Llama 3.1 frequency scaling, and Gemma 3's
GeGLU, norms around both sub-blocks, scaled embeddings, query scale and
sliding-window layers. A sliding-window layer is a fixed-capacity cache like
any other: `kvjax.policies.resolve` runs it with the `window` policy and the
chosen policy on the global layers, and the layer masks keys further back than
its window.

Every attention layer reads and updates its layer of a fixed-capacity
`kvjax.KVCache` through `kvjax.attend`; the cache carries each layer's policy,
so the model only passes the cache and the `kvjax.Step` down.
Parameter layout follows Hugging Face's `LlamaForCausalLM` (projections stored
as [in, out] kernels) so checkpoints map one to one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

import kvjax


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static model hyper-parameters (names follow Hugging Face's config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10_000.0
    rope_interleaved: bool = False
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3)
    rope_scaling: kvjax.rope.Llama3Scaling | None = None  # Llama 3.1
    # Gemma 3:
    hidden_act: str = "silu"  # or "gelu_tanh" (GeGLU)
    sandwich_norm: bool = False  # norms after attention and around the FFN
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + w); HF Gemma stores w - 1
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (default head_dim)
    sliding_window: int | None = None  # tokens a sliding layer sees, the current one included
    layer_types: tuple[str, ...] | None = None  # "sliding_attention" | "full_attention" per layer
    rope_local_theta: float | None = None  # RoPE base of sliding layers
    tie_embeddings: bool = False
    dtype: str = "float32"
    dmc_decisions: bool = False  # q/k dimension d-1 carries DMC's learned decisions (set after kvjax.retrofit)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # from a saved config.json
            object.__setattr__(self, "rope_scaling", kvjax.rope.Llama3Scaling(**self.rope_scaling))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {"sliding_attention", "full_attention"}:
                raise ValueError(f"layer_types must name 'sliding_attention' or 'full_attention' for each of {self.num_layers} layers")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding_attention layers need sliding_window")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"hidden_act must be 'silu' or 'gelu_tanh', got {self.hidden_act!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError("hidden_size must be divisible by num_heads when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A 2-layer GQA model for tests, demos and benchmarks."""
        base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
        return cls(**{**base, **overrides})

    def cache_spec(self) -> kvjax.CacheSpec:
        """The cache this model asks for (what `kvjax.plan_capacity` sizes)."""
        windows = tuple(self.sliding_window if self.is_sliding(i) else None for i in range(self.num_layers))
        return kvjax.CacheSpec(
            num_layers=self.num_layers, kv_heads=self.num_kv_heads, head_dim=self.head_dim, dtype=self.dtype,
            sliding_windows=windows if any(windows) else None, dmc_decisions=self.dmc_decisions,
        )

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

    def rope(self, layer: int) -> kvjax.Rope:
        if self.is_sliding(layer) and self.rope_local_theta is not None:
            return kvjax.Rope(theta=self.rope_local_theta, interleaved=self.rope_interleaved)
        return kvjax.Rope(theta=self.rope_theta, interleaved=self.rope_interleaved, scaling=self.rope_scaling)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


class RMSNorm(nnx.Module):
    """x / rms(x) * w, computed in f32 (Zhang & Sennrich, arXiv 1910.07467)."""

    def __init__(self, dim: int, cfg: LlamaConfig):
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - cfg.norm_offset, jnp.dtype(cfg.dtype)))
        self.eps, self.offset = cfg.rms_norm_eps, cfg.norm_offset

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def _linear(cfg: LlamaConfig, n_in: int, n_out: int, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
    dtype = jnp.dtype(cfg.dtype)
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, rngs: nnx.Rngs):
        self.cfg, self.layer = cfg, layer
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(cfg, d, cfg.num_heads * hd, rngs, cfg.attention_bias)
        self.k_proj = _linear(cfg, d, cfg.num_kv_heads * hd, rngs, cfg.attention_bias)
        self.v_proj = _linear(cfg, d, cfg.num_kv_heads * hd, rngs, cfg.attention_bias)
        self.o_proj = _linear(cfg, cfg.num_heads * hd, d, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg)
            self.k_norm = RMSNorm(hd, cfg)

    def qkv(self, x):
        """Pre-RoPE queries [B, S, Hq, D], keys and values [B, S, H, D]."""
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def __call__(self, x, cache: kvjax.KVCache, step: kvjax.Step):
        q, k, v = self.qkv(x)
        cfg = self.cfg
        out, cache = kvjax.attend(
            cache, self.layer, q, k, v, step=step, rope=cfg.rope(self.layer), scale=cfg.attention_scale,
            sliding_window=cfg.sliding_window if cfg.is_sliding(self.layer) else None,
        )
        return self.o_proj(out.reshape(*x.shape[:2], -1)), cache

    def full_sequence(self, x, attention_fn, key):
        """Attention of a whole sequence through `attention_fn` (training); returns (output, its aux)."""
        q, k, v = self.qkv(x)
        out, aux = attention_fn(q, k, v, rope=self.cfg.rope(self.layer), scale=self.cfg.attention_scale, layer=self.layer, key=key)
        return self.o_proj(out.reshape(*x.shape[:2], -1)), aux


class MLP(nnx.Module):
    """Gated feed-forward: SwiGLU or GeGLU (Shazeer, arXiv 2002.05202)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.hidden_act = cfg.hidden_act
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)

    def __call__(self, x):
        gate = self.gate_proj(x)
        gate = jax.nn.silu(gate) if self.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)
        return self.down_proj(gate * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, rngs: nnx.Rngs):
        self.sandwich = cfg.sandwich_norm
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.self_attn = Attention(cfg, layer, rngs)
        # Hugging Face names: in Llama the norm before the FFN is "post_attention".
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cache, step):
        return self.residual(x, lambda y: self.self_attn(y, cache, step))

    def residual(self, x, attention):
        """The block around `attention(normed x) -> (h, extra)`; returns (x, extra)."""
        h, extra = attention(self.input_layernorm(x))
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), extra
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), extra


class Llama(nnx.Module):
    """Decoder-only Llama; implements `kvjax.CachedDecoder`."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg)
        self.lm_head = None if cfg.tie_embeddings else _linear(cfg, cfg.hidden_size, cfg.vocab_size, rngs)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    def cache_spec(self) -> kvjax.CacheSpec:
        return self.cfg.cache_spec()

    def embed(self, tokens: Int[Array, "B S"]) -> Float[Array, "B S d"]:
        x = self.embed_tokens(tokens)
        return x * jnp.asarray(self.cfg.hidden_size**0.5, x.dtype) if self.cfg.embed_scale else x

    def __call__(self, tokens: Int[Array, "B S"], cache: kvjax.KVCache, step: kvjax.Step):
        x = self.embed(tokens)
        for block in self.layers:
            x, cache = block(x, cache, step)
        return self.norm(x), cache

    def full_sequence(self, tokens: Int[Array, "B T"], attention_fn, key: jax.Array | None = None):
        """Logits [B, T, V] of whole sequences with no cache, every layer's attention computed by
        `attention_fn(q, k, v, *, rope, scale, layer, key)` -> (out, aux) (see `kvjax.retrofit`);
        returns (logits, per-layer aux). The training path; sliding-window layers are not supported."""
        if self.cfg.sliding_window:
            raise ValueError("full_sequence: models with sliding-window layers are not supported")
        key = jax.random.key(0) if key is None else key
        x = self.embed(tokens)
        aux = []
        for block in self.layers:
            x, extra = block.residual(x, lambda y, blk=block: blk.self_attn.full_sequence(y, attention_fn, key))
            aux.append(extra)
        return self.logits(self.norm(x)), aux

    def logits(self, hidden: Float[Array, "*B d"]) -> Float[Array, "*B V"]:
        hidden = hidden.astype(jnp.dtype(self.cfg.dtype))
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)
