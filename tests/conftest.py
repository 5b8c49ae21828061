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

import tests.example_policy  # noqa: E402, F401  (a third-party policy: every registry-wide test covers it)


MAPPINGS = "/proc/self/maps"


def pytest_collection_modifyitems(config, items):
    """`device` tests compile the kernels for a GPU or TPU: skipped on a CPU backend
    (run them with `python -m experiments.device_check` on an accelerator)."""
    if jax.default_backend() in ("gpu", "tpu"):
        return
    skip = pytest.mark.skip(reason="needs a GPU or TPU (run python -m experiments.device_check there)")
    for item in items:
        if "device" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Free compiled programs when the process nears Linux's 65,530 memory-mapping
    limit (vm.max_map_count): every XLA CPU executable holds mappings, the suite's
    passed the limit, and compiling then segfaulted (test_policies alone reaches 37k)."""
    yield
    if os.path.exists(MAPPINGS):
        with open(MAPPINGS) as f:
            if sum(1 for _ in f) > 20_000:
                jax.clear_caches()
                gc.collect()
