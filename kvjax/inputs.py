"""Checks of what users pass to the public entries (`generate`, `evaluate`, `calibrate`, `prefill`).

A number kvjax prints must be the number it claims to be, so bad input is
refused with a message that names it, instead of running to a wrong result:
- token batches: a [batch, length] integer array, or a list of rows of
  different lengths (ragged; padded here, the padding masked);
- token ids inside [0, vocab_size): JAX clamps an out-of-range gather index,
  so a tokenizer that does not match the model, or -1 padding, would otherwise
  run silently on the wrong embeddings;
- PRNG keys: a `jax.random.key`, or an int seed.

The checks need concrete values. Under an outer `jax.jit` the ids are tracers
and are not checked (JAX clamps them); run the call under
`jax.experimental.checkify.checkify(..., errors=checkify.index_checks)` there
to catch them inside the program.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _ragged(rows: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad rows of different lengths with 0; the mask marks the real tokens."""
    arrays = []
    for i, row in enumerate(rows):
        a = np.asarray(row)
        if a.ndim != 1:
            raise ValueError(f"row {i} of the token list has shape {a.shape}; each row must be a 1-D sequence of ids")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"row {i} holds {a.dtype} values; token ids must be integers")
        arrays.append(a.astype(np.int64))
    width = max((a.size for a in arrays), default=0)
    tokens = np.zeros((len(arrays), max(width, 1)), np.int64)
    mask = np.zeros(tokens.shape, bool)
    for i, a in enumerate(arrays):
        tokens[i, : a.size], mask[i, : a.size] = a, True
    return tokens, mask


def token_batch(tokens, *, vocab_size: int, lengths=None, mask=None, name: str = "tokens",
                lengths_name: str = "lengths", mask_name: str = "mask"):
    """(ids [B, T] int32, mask [B, T] bool) from a 2-D array or a list of (ragged) rows.

    `lengths` [B] (right padding) or `mask` [B, T] (any padding) mark the real
    tokens of a 2-D array; padding may hold any value. Every row needs a token,
    and every real id must lie in [0, vocab_size). `*_name`: the caller's argument names.
    """
    if mask is not None and lengths is not None:
        raise ValueError(f"pass {lengths_name} (right padding) or {mask_name} (any padding), not both")
    ragged = isinstance(tokens, (list, tuple)) and (len(tokens) == 0 or not np.isscalar(tokens[0]))
    if ragged and (mask is not None or lengths is not None):
        raise ValueError(f"{name} given as a list of rows is padded here; pass no {lengths_name} or {mask_name} with it")
    if ragged:
        if len(tokens) == 0:
            raise ValueError(f"{name} is empty: give at least one row of token ids")
        ids, real = _ragged(tokens)
    else:
        ids = np.asarray(tokens)
        if ids.ndim != 2:
            hint = " (one sequence? wrap it: [ids])" if ids.ndim == 1 else ""
            raise ValueError(f"{name} must be [batch, length] token ids or a list of rows, got shape {ids.shape}{hint}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        real = _mask(*ids.shape, lengths, mask, lengths_name, mask_name)
    empty = np.flatnonzero(~real.any(-1))
    if empty.size:
        raise ValueError(f"{name} rows {empty.tolist()} have no valid token; every row needs at least one (an empty string encodes to none)")
    check_ids(ids, real, vocab_size, name)
    return np.where(real, ids, 0).astype(np.int32), real


def _mask(b: int, t: int, lengths, mask, lengths_name: str, mask_name: str) -> np.ndarray:
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != (b, t) or m.dtype != bool:
            raise ValueError(f"{mask_name} must be a bool array of shape {(b, t)}, got {m.dtype} {m.shape}")
        return m
    if lengths is not None:
        n = np.asarray(lengths)
        if n.shape != (b,) or not np.issubdtype(n.dtype, np.integer):
            raise ValueError(f"{lengths_name} must be {b} ints (one per row), got {n.dtype} {n.shape}")
        if (n < 0).any() or (n > t).any():
            raise ValueError(f"{lengths_name} must lie in [1, {t}], got {n.tolist()}")
        return np.arange(t)[None, :] < n[:, None]
    return np.ones((b, t), bool)


def check_ids(ids, real, vocab_size: int, name: str = "tokens") -> None:
    """Raise if a real token id is outside [0, vocab_size), naming the first offender."""
    ids = np.asarray(ids)
    bad = np.argwhere(real & ((ids < 0) | (ids >= vocab_size)))
    if bad.size:
        row, pos = bad[0]
        raise ValueError(
            f"{name}: token id {int(ids[row, pos])} at row {row}, position {pos} is outside the model's vocabulary "
            f"[0, {vocab_size}) ({len(bad)} such ids); the tokenizer does not match the model, or padding was "
            "passed as ids (give ragged rows, lengths or a mask instead)"
        )


def prng_key(key, *, needed: bool, what: str) -> jax.Array:
    """A PRNG key from a key or an int seed; `needed` (sampling) refuses None."""
    if key is None:
        if needed:
            raise ValueError(f"{what} draws random numbers: pass key=jax.random.key(0) (or an int seed), as JAX asks for explicit keys")
        return jax.random.key(0)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if isinstance(key, jax.Array) and key.shape == (2,) and key.dtype == np.uint32:
        return jax.random.wrap_key_data(key)
    raise TypeError(f"key must be jax.random.key(seed) or an int seed, got {type(key).__name__}")
