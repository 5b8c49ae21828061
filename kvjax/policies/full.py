"""The uncompressed reference: every token keeps its slot.

`capacity` must be at least the prompt plus the generated tokens; `check_length`
raises rather than silently evicting.
"""

from __future__ import annotations

import dataclasses

from kvjax.policies.scorer import ScorerPolicy


@dataclasses.dataclass(frozen=True)
class Full(ScorerPolicy):
    """Keeps: everything. Scores: none. capacity = the longest sequence."""

    name = "full"

    def check_length(self, tokens: int, what: str = "prompt + max_new_tokens") -> None:
        if self.capacity < tokens:
            raise ValueError(
                f"policy {self.name!r} never evicts but capacity={self.capacity} < {what} = {tokens}; "
                f"raise its capacity to at least {tokens}"
            )
