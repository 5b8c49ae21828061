"""Shape-documenting array annotations that need no dependency beyond JAX.

`Float[Array, "B H R D"]` reads like jaxtyping's and evaluates to `jax.Array`:
the shapes document the kernels, and `kvjax.attention` checks them at its
boundary with jaxtyping, so `pallas_kernels` depends on JAX alone.
"""

import jax

Array = jax.Array


class _Shaped:
    def __class_getitem__(cls, item) -> type:
        return jax.Array


class Float(_Shaped):
    """A floating-point array of the given shape."""


class Int(_Shaped):
    """An integer array of the given shape."""


class Bool(_Shaped):
    """A boolean array of the given shape."""
