"""What the policy contract promises about the code's structure (it can regress silently otherwise)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import kvjax
from kvjax.policies import REGISTRY

ROOT = pathlib.Path(__file__).resolve().parents[1]
OLD_FLAGS = ("owns_update", "shares_keys", "merges", "pure_eviction", "evicts", "rotate_at_cache_position", "max_distance", "stats")


def test_no_capability_flags_are_read():
    """Capabilities are types and parts: no module of kvjax reads a policy flag, and no policy has one."""
    read = re.compile(r"\.(" + "|".join(OLD_FLAGS) + r")\b")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "kvjax").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if read.search(line)]
    assert not hits, f"policy flags read at {hits}"
    policies = [kvjax.Policy, kvjax.policies.ScorerPolicy, kvjax.policies.MergingPolicy, *(f for f in REGISTRY.values() if isinstance(f, type))]
    assert not [(cls.__name__, flag) for cls in policies for flag in OLD_FLAGS if hasattr(cls, flag)]


def test_attend_is_checks_and_one_dispatch():
    source = (ROOT / "kvjax" / "attend.py").read_text()
    assert source.count(".update(") == 1 and "isinstance" not in source and "policy." not in source


def test_pallas_kernels_depends_on_jax_alone():
    """Importing and running the kernels' reference with every other dependency blocked."""
    blocked = ["jaxtyping", "beartype", "einops", "flax", "chex", "kvjax", "models"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import jax.numpy as jnp, pallas_kernels\n"
        "z = jnp.zeros((1, 1, 2, 4)); v = jnp.ones((1, 1, 2), bool)\n"
        "out, _, _ = pallas_kernels.cache_attention_reference(z, z, z, v, z, z, jnp.ones((1, 2), bool), group=1, scale=1.0)\n"
        "assert out.shape == (1, 1, 2, 4)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
