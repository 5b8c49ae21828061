"""Where experiments put their numbers: one JSON file per run (results/ is not committed)."""

from __future__ import annotations

import json
import pathlib


def write_json(path, data) -> pathlib.Path:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")
    return out
