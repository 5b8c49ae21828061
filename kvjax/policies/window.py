"""Sliding window and StreamingLLM: attention sinks + the most recent tokens.

StreamingLLM (Xiao et al., arXiv 2309.17453): keep the first `sinks` tokens
(default 4) and the last `capacity - sinks`; evict the oldest non-sink token.
No scores. `window` is the same cache with no sinks (a BCT-style ring buffer,
arXiv 2411.15785, whose exact update rule is not published); models run their
sliding-window layers with it.

Both RoPE conventions are offered:
- as is: keys are rotated once, at their original positions;
- `KeyRerotation(StreamingLLM(...))` (the paper's, Sec. 3.2; `make(..., rerotate=True)`):
  keys are stored before RoPE and rotated at their position inside the cache
  (sinks 0..sinks-1, then the window in order), and the query at the position
  after the last cached token. This costs one extra rotation of the cache per step.
"""

from __future__ import annotations

import dataclasses

from kvjax.policies.base import derive_defaults
from kvjax.policies.scorer import ScorerPolicy


@dataclasses.dataclass(frozen=True)
class StreamingLLM(ScorerPolicy):
    """Keeps: sinks + recent window (window = capacity - sinks). Scores: none."""

    sinks: int = 4
    window: int | None = None

    name = "streaming_llm"

    def __post_init__(self):
        derive_defaults(self, window=lambda c: max(c - self.sinks, 0))
        super().__post_init__()


@dataclasses.dataclass(frozen=True)
class Window(StreamingLLM):
    """Keeps: the last `capacity` tokens (no sinks). Scores: none."""

    sinks: int = 0
    name = "window"
