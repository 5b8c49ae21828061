"""kvjax: LLM inference with a predefined KV-cache capacity.

Every layer's cache has a fixed number of slots however long the context
grows; a compression policy (kvjax.policies) decides what the slots hold.
Training (DMC's retrofit) lives in kvjax.retrofit (losses, relaxed attention),
kvjax.data (packed batches) and kvjax.train (the loop; imported on its own).
A policy implements `Policy.update` (the general tier) or is a `score` on
`kvjax.policies.ScorerPolicy` (the common tier); see kvjax.policies.
kvjax.sharding places a model and its cache on a (data, model) device mesh.
kvjax.quant holds the slot storage formats (int8, fp8, bfloat16) that any policy
takes through `kv_dtype` (`kvjax.policies.Quantized`).
"""

from kvjax import calibrate, data, evaluate, policies, retrofit, rope, sharding
from kvjax.attend import attend
from kvjax.attention import LayerAttention, attention
from kvjax.cache import KVCache, init_cache
from kvjax.generate import DecodeState, GenerateOutput, Stream, generate, stream
from kvjax.plan import CapacityPlan, plan_capacity
from kvjax.policies.base import Policy, Step
from kvjax.protocol import CacheSpec, CachedDecoder
from kvjax.rope import Rope
from kvjax.run import forward_chunk, make_step, prefill
from kvjax.sampling import Sampler

__all__ = [
    "CacheSpec", "CachedDecoder", "CapacityPlan", "DecodeState", "GenerateOutput", "KVCache", "LayerAttention", "Policy", "Rope", "Sampler", "Step", "Stream",
    "attend", "attention", "calibrate", "data", "evaluate", "forward_chunk", "generate", "init_cache", "make_step", "plan_capacity", "policies", "prefill", "retrofit", "sharding", "stream",
]
