"""The uncompressed reference: every token keeps its slot.

`capacity` must be at least the prompt plus the generated tokens; generate
checks this and raises rather than silently evicting.
"""

from __future__ import annotations

import dataclasses

from kvjax.policies.base import Policy


@dataclasses.dataclass(frozen=True)
class Full(Policy):
    """Keeps: everything. Scores: none. capacity = the longest sequence."""

    name = "full"
    evicts = False
