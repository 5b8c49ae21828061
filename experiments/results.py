"""Where experiments put their numbers (results/ is not committed): one JSON file per run, or JSON
lines appended one finished cell at a time, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import pathlib


def write_json(path, data) -> pathlib.Path:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")
    return out


def read_jsonl(path) -> list[dict]:
    path = pathlib.Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path, row: dict) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def save_figure(fig, path) -> pathlib.Path:
    """Lay out `fig`, write it to `path` at 120 dpi and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return pathlib.Path(path)
