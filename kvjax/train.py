"""A training loop for NNX models: optax AdamW, Orbax checkpoints with exact resume, progress, JSON logs.

`train(model, loss_fn, batches, config, workdir=...)` updates the model in
place. Every `checkpoint_every` steps (and at the end) the parameters and the
optimiser state are saved with Orbax in `workdir`; a run started on a
workdir that holds checkpoints resumes from the newest. Batches and the
per-step PRNG key are functions of the step, so a resumed run follows the
uninterrupted run's loss curve exactly. One JSON line per step goes to
`workdir/log.jsonl` (lines past the restored step are dropped on resume).

SPMD: a model whose weights are on a mesh (`kvjax.sharding.shard_model`)
trains on it, each batch's rows over `data` (data parallel; weights sharded
over `model` too where the mesh has that axis). The optimiser state takes the
weights' shardings, and a checkpoint restores onto whatever mesh the model is
on now: Orbax reshards (8 devices -> 1 -> 8 round-trips exactly).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from kvjax.sharding import batch_spec, mesh_of


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule (defaults follow the DMC recipe: Adam(0.9, 0.95), decay 0.1, clip 1.0)."""

    steps: int
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    final_lr_fraction: float = 0.1  # cosine decay to this fraction of the peak
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    checkpoint_every: int = 0  # 0: only at the end
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps={self.steps}), got {self.warmup_steps}")

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            0.0 if self.warmup_steps else self.learning_rate, self.learning_rate, self.warmup_steps,
            self.steps, self.learning_rate * self.final_lr_fraction,
        )

    def optimizer(self) -> optax.GradientTransformation:
        """Global-norm clipping, then AdamW with decay on matrices only (not norms or biases)."""
        decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)  # noqa: E731
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.adamw(self.schedule(), self.b1, self.b2, weight_decay=self.weight_decay, mask=decay_mask),
        )


LossFn = Callable  # (model, batch [B, L+1], step, key) -> (loss, dict of scalar metrics)


def train_step(graphdef, rest, tx: optax.GradientTransformation, loss_fn: LossFn, seed: int):
    """The jitted update `(params, opt_state, batch, step) -> (params, opt_state, metrics)`: loss and
    grads of `loss_fn` on the model rebuilt from (graphdef, params, rest), then one optimizer step.
    A function of its own so it can be lowered without running (tests export it for TPU)."""

    @jax.jit
    def step_fn(params, opt_state, batch, step):
        def loss(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch, step, jax.random.fold_in(jax.random.key(seed), step))

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": value, "grad_norm": optax.tree.norm(grads), **metrics}

    return step_fn


def train(
    model: nnx.Module, loss_fn: LossFn, batches: Callable[[int], np.ndarray], config: TrainConfig, *,
    workdir: str | pathlib.Path | None = None, progress: bool = True, description: str = "train",
) -> list[dict]:
    """Train `model` in place for `config.steps` steps (resuming from `workdir`); returns this run's log records."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = config.optimizer()
    opt_state = tx.init(params)
    start = 0
    manager = log_path = None
    if workdir is not None:
        workdir = pathlib.Path(workdir).absolute()
        manager = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=True),
        )
        log_path = workdir / "log.jsonl"
        if manager.latest_step() is not None:
            start = manager.latest_step()
            params, opt_state = _restore(manager, start, params, opt_state)
            _truncate_log(log_path, start)

    step_fn = train_step(graphdef, rest, tx, loss_fn, config.seed)
    mesh = mesh_of(model)
    records = []
    bar = tqdm(total=config.steps, initial=start, desc=description, disable=not progress, dynamic_ncols=True)
    schedule = config.schedule()
    for step in range(start, config.steps):
        batch = batches(step)
        batch = jnp.asarray(batch) if mesh is None else jax.device_put(batch, batch_spec(mesh, batch.shape[0]))
        t0 = time.perf_counter()
        params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.int32(step))
        metrics = {k: float(v) for k, v in metrics.items()}
        seconds = time.perf_counter() - t0
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss']} at step {step + 1}; lower learning_rate (now {config.learning_rate})")
        record = {"step": step + 1, **metrics, "lr": float(schedule(step)),
                  "tokens_per_s": batch.shape[0] * (batch.shape[1] - 1) / seconds}
        records.append(record)
        bar.update(1)
        bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "cr", "tokens_per_s") if k in record}, refresh=False)
        if log_path is not None:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        done = step + 1
        if manager is not None and (done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0)):
            manager.save(done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    nnx.update(model, params)
    return records


def _restore(manager: ocp.CheckpointManager, step: int, params, opt_state):
    """The checkpoint of `step`, each array placed like the current run's (the mesh may differ from the writer's)."""
    target = {"params": params, "opt_state": opt_state}
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as err:  # orbax raises many kinds for a damaged directory
        raise ValueError(
            f"checkpoint {manager.directory}/{step} could not be restored ({type(err).__name__}: {err}); it is "
            f"corrupt or from a different model/optimiser: delete it or train in another workdir"
        ) from err
    return restored["params"], restored["opt_state"]


def _truncate_log(path: pathlib.Path, step: int) -> None:
    """Keep the log lines up to the restored step (a crashed run may have logged past its last checkpoint)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))

