"""Sliding window and StreamingLLM: attention sinks + the most recent tokens.

StreamingLLM (Xiao et al., arXiv 2309.17453): keep the first `sinks` tokens
(default 4) and the last `capacity - sinks`; evict the oldest non-sink token.
No scores. `window` is the same cache with no sinks (a BCT-style ring buffer,
arXiv 2411.15785, whose exact update rule is not specified in its source).

`max_distance=capacity` masks keys further back than `capacity` positions, so
a chunked prefill is an exact sliding window of capacity + 1 tokens (the
current one included): how models express their sliding-window layers.

Both RoPE conventions are offered:
- rerotate=False: keys are rotated once, at their original positions.
- rerotate=True (the paper's): keys are stored before RoPE and rotated at their
  position inside the cache (sinks 0..sinks-1, then the window in order), and
  the query at the position after the last cached token. This costs one extra
  rotation of the cache per step.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.policies.base import Policy, Step
from kvjax.select import INT_MAX


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Policy):
    """Keeps: sinks + recent window (window = capacity - sinks). Scores: none."""

    sinks: int = 4
    window: int | None = None
    rerotate: bool = False
    max_distance: int | None = None

    name = "streaming_llm"

    def __post_init__(self):
        if self.window is None:
            object.__setattr__(self, "window", max(self.capacity - self.sinks, 0) if isinstance(self.capacity, int) else 0)
        super().__post_init__()

    @property
    def rotate_at_cache_position(self) -> bool:
        return self.rerotate

    def key_positions(self, pos, valid, step: Step):
        """Rank of each token inside the cache (the cache is sinks + a contiguous window)."""
        if not self.rerotate:
            return None, step.positions
        sink = valid & (pos < self.sinks)
        n_sink = sink.sum(-1, keepdims=True)
        start = jnp.where(valid & ~sink, pos, INT_MAX).min(-1, keepdims=True)
        cache_pos = jnp.where(sink, pos, n_sink + pos - start)
        n_cached = valid[:, 0].sum(-1, keepdims=True)  # every head holds the same tokens
        chunk_pos = n_cached + jnp.cumsum(step.new_valid, axis=-1) - 1
        return cache_pos, chunk_pos.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Window(StreamingLLM):
    """Keeps: the last `capacity` tokens (no sinks). Scores: none."""

    sinks: int = 0
    name = "window"
