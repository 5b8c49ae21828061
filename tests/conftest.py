import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import HealthCheck, settings  # noqa: E402

# Each example compiles a program: few examples, no deadline.
settings.register_profile(
    "kvjax", max_examples=8, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("kvjax")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Free each test's compiled programs. Every XLA CPU executable holds memory
    mappings; kept for the whole suite they passed Linux's 65,530-mapping limit
    (vm.max_map_count), where compiling segfaults (test_policies alone reached 37k)."""
    yield
    jax.clear_caches()
    gc.collect()
