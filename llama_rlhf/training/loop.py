"""The generic training loop: data order, train and eval steps, throughput and MFU, resume.

A stage supplies a loss function and a way to build the batch of a given step. This module
turns the loss into a pure jitted train step with explicit shardings and donated state. It runs
that step with logging, evaluation, checkpointing and resume. The data order depends only on
(seed, epoch, step), so a run restarted with the same command continues from its last
checkpoint with exactly the batches an uninterrupted run would have seen.

NOTE: batches are placed with `jax.device_put` from one host process; multi-host runs would
need each process to build only its own shard of the batch.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from llama_rlhf import sharding as shd
from llama_rlhf.training.checkpoints import Checkpointer
from llama_rlhf.training.metrics import MetricWriter, reduce_metrics
from llama_rlhf.training.state import TrainState

CHECKPOINT_DIR = "checkpoints"

# Dense (no sparsity) bf16 peak FLOP/s per chip, from the vendors' datasheets: Google Cloud TPU
# system architecture pages (v4, v5e, v5p, v6e) and NVIDIA's A100, H100 and H200 datasheets.
# Matched against `device_kind` in lower case, first match wins, so specific names come first.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("a100", 312e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
)


# ---------------------------------------------------------------------------------------------
# Data order.


@dataclasses.dataclass(frozen=True)
class DataOrder:
    """The example indices of every step: a fresh permutation per epoch from (seed, epoch).

    Each epoch has `num_examples // batch_size` full batches; the remainder of the permutation
    is skipped so every batch has the same shape (and the step compiles once).
    """

    num_examples: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}.")
        if self.num_examples < self.batch_size:
            raise ValueError(
                f"{self.num_examples} examples are fewer than one batch of {self.batch_size}; "
                "lower the batch size or add data."
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    @functools.lru_cache(maxsize=4)  # noqa: B019 (the instance is small, frozen and hashable)
    def permutation(self, epoch: int) -> np.ndarray:
        """Returns the example order of `epoch`, a function of (seed, epoch) only."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def position(self, step: int) -> dict[str, int]:
        """Returns where `step` reads: {"epoch": e, "batch_in_epoch": i}."""
        epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch}

    def indices(self, step: int) -> np.ndarray:
        """Returns the example indices of the batch of `step` (0-based)."""
        position = self.position(step)
        start = position["batch_in_epoch"] * self.batch_size
        return self.permutation(position["epoch"])[start:start + self.batch_size]

    def describe(self) -> dict[str, int]:
        return {"num_examples": self.num_examples, "batch_size": self.batch_size,
                "seed": self.seed}


# ---------------------------------------------------------------------------------------------
# Train and eval steps.


def batch_sharding_prefix(mesh: Mesh, batch_size: int) -> NamedSharding:
    """Returns the sharding of every batch array: the leading (batch) axis over data and fsdp."""
    return NamedSharding(
        mesh, shd.logical_to_spec((shd.BATCH,), (batch_size,), dict(mesh.shape))
    )


def shard_batch(mesh: Mesh, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Moves a host batch to the devices with its leading axis sharded over data and fsdp."""
    return {
        name: jax.device_put(value, shd.batch_sharding(mesh, np.shape(value)))
        for name, value in batch.items()
    }


def make_train_step(
    loss_fn: Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]],
    *,
    mesh: Mesh,
    state_shardings: TrainState,
    batch_size: int,
    schedule: Callable[[Any], Any] | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """Builds the jitted train step (state, batch, rng) -> (state, metrics).

    Args:
      loss_fn: (params, batch, rng) -> (loss, metrics): the scalar to minimize and a dict of
        (sum, count) metrics. Return "loss" as (loss * count, count) to weight log-time means
        by the number of targets; without it the step adds ("loss", (loss, 1)).
      mesh: the device mesh.
      state_shardings: the train state's shardings (from `create_train_state`).
      batch_size: the global batch size, to shard the batch's leading axis.
      schedule: lr(step), reported as "learning_rate" when given.

    Returns:
      A step, jitted with explicit in/out shardings, that donates the input state. It folds
      the state's step into `rng`, so one base key gives every step its own randomness. Its
      metrics add (sum, count) pairs for grad_norm (before clipping), param_norm (after the
      update), update_norm, learning_rate and tokens (real tokens, when the batch has a
      "mask").
    """
    replicated = shd.replicated(mesh)

    def step(state: TrainState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, rng
        )
        new_state, updates = state.apply_gradients(grads)

        metrics = dict(metrics)
        # Per-step values count once each in the log-time mean.
        step_count = jnp.ones((), jnp.float32)
        metrics.setdefault("loss", (loss.astype(jnp.float32), step_count))
        metrics["grad_norm"] = (optax.tree.norm(grads), step_count)
        metrics["param_norm"] = (optax.tree.norm(new_state.params), step_count)
        metrics["update_norm"] = (optax.tree.norm(updates), step_count)
        if schedule is not None:
            learning_rate = jnp.asarray(schedule(state.step), jnp.float32)
            metrics["learning_rate"] = (learning_rate, step_count)
        if "mask" in batch:
            metrics["tokens"] = (jnp.sum(batch["mask"], dtype=jnp.float32), step_count)
        return new_state, metrics

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding_prefix(mesh, batch_size), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

    def run(state, batch, rng):
        with jax.set_mesh(mesh):
            return jitted(state, batch, rng)

    return run


def make_eval_step(
    metrics_fn: Callable[[Any, Mapping[str, jax.Array]], dict],
    *,
    mesh: Mesh,
    param_shardings: Any,
    batch_size: int,
) -> Callable[[Any, Mapping[str, jax.Array]], dict]:
    """Jits metrics_fn(params, batch) -> dict of (sum, count) with explicit shardings."""
    jitted = jax.jit(
        metrics_fn,
        in_shardings=(param_shardings, batch_sharding_prefix(mesh, batch_size)),
        out_shardings=shd.replicated(mesh),
    )

    def run(params, batch):
        with jax.set_mesh(mesh):
            return jitted(params, batch)

    return run


def evaluate(
    eval_step: Callable[[Any, Mapping[str, jax.Array]], dict],
    params,
    batches,
    mesh: Mesh,
) -> dict[str, float]:
    """Runs `eval_step` over host batches and reduces the (sum, count) metrics to means."""
    per_batch = [eval_step(params, shard_batch(mesh, batch)) for batch in batches]
    return reduce_metrics(jax.device_get(per_batch))


# ---------------------------------------------------------------------------------------------
# Throughput and MFU.


@functools.cache
def measured_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """Measures the host's float32 matmul FLOP/s once per process (best of `repeats`)."""
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops(device: jax.Device | None = None) -> tuple[float | None, str]:
    """Returns (peak FLOP/s of one device, source), or (None, "unknown ...") when not in the table.

    On CPU the peak is measured (`measured_cpu_peak_flops`) and describes the whole host, since
    XLA's CPU devices share the host's cores.
    """
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measured_cpu_peak_flops(), "measured peak"
    kind = device.device_kind.lower()
    for pattern, flops in PEAK_FLOPS_PER_DEVICE:
        if pattern in kind:
            return flops, "datasheet bf16 peak"
    return None, f"unknown peak for {device.device_kind!r}"


class PerformanceMeter:
    """Steps/s, tokens/s and MFU over timing windows that exclude compilation and evaluation.

    MFU = flops_per_token × tokens/s ÷ (peak FLOP/s × devices), where tokens are the real
    (unpadded) tokens of the batch, so padding lowers MFU. On CPU the measured host peak is
    used once, not per fake device.

    Call `reset()` once the first (compiling) step has finished, and again after each pause such
    as evaluation or checkpointing. Call `measure(steps, tokens)` after blocking on the results
    of the steps dispatched since the last reset.
    """

    def __init__(self, flops_per_token: float | None, devices=None):
        devices = list(devices if devices is not None else jax.devices())
        self.flops_per_token = flops_per_token
        self.peak, self.peak_source = peak_flops(devices[0])
        self.num_peak_devices = 1 if devices[0].platform == "cpu" else len(devices)
        self._window_start: float | None = None
        self.total_seconds = 0.0
        self.total_steps = 0

    def reset(self) -> None:
        """Starts a new timing window now."""
        self._window_start = time.perf_counter()

    def measure(self, steps: int, tokens: float | None) -> dict[str, float]:
        """Ends the window with `steps` steps of `tokens` real tokens and starts a new one."""
        now = time.perf_counter()
        if self._window_start is None or steps <= 0:
            self._window_start = now
            return {}
        seconds = max(now - self._window_start, 1e-9)
        self._window_start = now
        self.total_seconds += seconds
        self.total_steps += steps
        result = {"perf/steps_per_second": steps / seconds}
        if tokens is not None:
            tokens_per_second = tokens / seconds
            result["perf/tokens_per_second"] = tokens_per_second
            if self.flops_per_token is not None and self.peak is not None:
                achieved = self.flops_per_token * tokens_per_second
                result["perf/mfu"] = achieved / (self.peak * self.num_peak_devices)
                result["perf/tflops_per_device"] = achieved / self.num_peak_devices / 1e12
        return result

    def eta_seconds(self, remaining_steps: int) -> float | None:
        """Estimates the time left from the mean step time measured so far."""
        if not self.total_steps:
            return None
        return remaining_steps * self.total_seconds / self.total_steps


def format_log_line(step: int, num_steps: int, train: Mapping[str, float],
                    perf: Mapping[str, float], eta: float | None, peak_source: str) -> str:
    """Formats one console line, e.g.
    `step 40/200 | loss 2.314 | 3.1 steps/s | 5,120 tok/s | MFU 12.3% | eta 0:00:52`."""
    parts = [f"step {step}/{num_steps}", f"loss {train.get('loss', math.nan):.4g}"]
    if "perf/steps_per_second" in perf:
        parts.append(f"{perf['perf/steps_per_second']:.3g} steps/s")
    if "perf/tokens_per_second" in perf:
        parts.append(f"{perf['perf/tokens_per_second']:,.0f} tok/s")
    if "perf/mfu" in perf:
        parts.append(f"MFU {100 * perf['perf/mfu']:.3g}% ({peak_source})")
    if eta is not None:
        parts.append(f"eta {datetime.timedelta(seconds=round(eta))}")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# The loop.


def default_loop_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Returns the loop settings, updated by `overrides`.

    Fields:
      log_every: steps between console lines and train metric records.
      eval_every: steps between evaluations; 0 evaluates only at the end.
      checkpoint_every: steps between checkpoints; one is always written at the end.
      max_checkpoints_to_keep: how many of the latest checkpoints stay on disk.
    """
    config = ml_collections.ConfigDict(
        {"log_every": 10, "eval_every": 0, "checkpoint_every": 500, "max_checkpoints_to_keep": 2}
    )
    unknown = sorted(set(overrides) - set(config.keys()))
    if unknown:
        raise KeyError(f"Unknown loop config fields {unknown}; valid fields: {sorted(config)}.")
    config.update(overrides)
    return config


@dataclasses.dataclass
class LoopResult:
    """The result of `train_loop`.

    Attributes:
      state: the final train state.
      step: the number of completed steps.
      train_metrics: the last logged train metrics (without the "train/" prefix).
      eval_metrics: the last evaluation's metrics (without the "eval/" prefix).
      resumed_from: the checkpoint step the run resumed from, or None for a fresh start.
    """

    state: TrainState
    step: int
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    resumed_from: int | None


def _check_finite(entries, workdir) -> None:
    """Raises FloatingPointError naming the first step whose loss or grad norm is not finite."""
    for step, metrics in entries:
        for name in ("loss", "grad_norm"):
            if name not in metrics:
                continue
            total, count = metrics[name]
            value = float(total) / float(count) if float(count) else float(total)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"The {name.replace('_', ' ')} is {value} at step {step}; stopping. The last "
                    f"checkpoint in {workdir} precedes it. Lower the learning rate or check the "
                    "data of that step."
                )


def train_loop(
    *,
    workdir: str | os.PathLike,
    loop_config: ml_collections.ConfigDict,
    num_steps: int,
    abstract_state: TrainState,
    init_state: TrainState | Callable[[], TrainState],
    train_step: Callable[[TrainState, Mapping[str, jax.Array], jax.Array], tuple[TrainState, dict]],
    batch_fn: Callable[[int], Mapping[str, np.ndarray]],
    rng: jax.Array,
    mesh: Mesh,
    eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
    flops_per_token: float | None = None,
    data_order: DataOrder | None = None,
    checkpoint_metadata: Mapping[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> LoopResult:
    """Trains for `num_steps` steps, resuming from the latest checkpoint in `workdir`.

    Args:
      workdir: the run's folder; checkpoints go to `workdir/checkpoints`, metrics to
        `workdir/metrics.jsonl` and `workdir/tensorboard`.
      loop_config: see `default_loop_config`.
      num_steps: the total number of steps of the run (not of this call).
      abstract_state: shapes and shardings to restore a checkpoint into
        (`train_state_shardings`).
      init_state: the initial state, or a function that creates it. It is only used when there
        is no checkpoint, so a function avoids loading weights that a resume would discard.
      train_step: from `make_train_step`.
      batch_fn: step -> host batch (dict of numpy arrays) for 0-based `step`. It must depend
        only on the step (and fixed settings), which makes resume exact.
      rng: the base key; the train step folds the step into it.
      mesh: the device mesh.
      eval_fn: state -> metrics, run every `eval_every` steps and at the end.
      flops_per_token: the model's training FLOPs per token at the batch's sequence length,
        for MFU (`LlamaConfig.flops_per_token(seq_len)`).
      data_order: recorded in checkpoints (its settings and the position of the next step).
      checkpoint_metadata: JSON settings saved with each checkpoint and compared on resume;
        a mismatch (for example another data set) raises instead of silently continuing.
      on_step: called with the completed step count after each step (a test hook; raising
        in it interrupts the run as a kill would).

    Returns:
      A `LoopResult`.

    Raises:
      FloatingPointError: a loss or gradient norm became NaN or infinite (the message names
        the step).
      ValueError: the checkpoint was written with different `checkpoint_metadata`.
    """
    workdir = pathlib.Path(workdir)
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}.")
    metadata = dict(checkpoint_metadata or {})
    if data_order is not None:
        metadata["data_order"] = data_order.describe()
    metadata["num_steps"] = int(num_steps)

    checkpointer = Checkpointer(workdir / CHECKPOINT_DIR,
                                max_to_keep=int(loop_config.max_checkpoints_to_keep))
    resumed_from = checkpointer.latest_step()
    if resumed_from is not None:
        state, extra = checkpointer.restore(abstract_state)
        saved = extra.get("metadata", {})
        if saved != json_roundtrip(metadata):
            checkpointer.close()
            raise ValueError(
                f"The checkpoint at step {resumed_from} in {checkpointer.directory} was written "
                f"with settings {saved}, but this run has {json_roundtrip(metadata)}. Resume with "
                "the same config or use a new workdir."
            )
        position = f" (data position {data_order.position(resumed_from)})" if data_order else ""
        logging.info("Resuming from the checkpoint at step %d in %s%s.", resumed_from,
                     checkpointer.directory, position)
    else:
        state = init_state() if callable(init_state) else init_state
    start_step = int(jax.device_get(state.step))

    writer = MetricWriter(workdir, purge_step=start_step + 1 if resumed_from is not None else None)
    meter = PerformanceMeter(flops_per_token, devices=list(mesh.devices.flat))
    log_every = max(int(loop_config.log_every), 1)
    eval_every = int(loop_config.eval_every)
    checkpoint_every = int(loop_config.checkpoint_every)

    # (completed step, device metrics, whether the step falls in the current timing window).
    pending: list[tuple[int, dict, bool]] = []
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    first_step = True

    def log(done: int) -> None:
        nonlocal train_metrics
        fetched = [(step, jax.device_get(metrics), timed) for step, metrics, timed in pending]
        _check_finite([(step, metrics) for step, metrics, _ in fetched], workdir)
        timed = [metrics for _, metrics, is_timed in fetched if is_timed]
        tokens = None
        if timed and all("tokens" in metrics for metrics in timed):
            tokens = sum(float(metrics["tokens"][0]) for metrics in timed)
        perf = meter.measure(len(timed), tokens)
        train_metrics = reduce_metrics(metrics for _, metrics, _ in fetched)
        writer.write_scalars(done, {**{f"train/{k}": v for k, v in train_metrics.items()}, **perf})
        writer.flush()
        eta = meter.eta_seconds(num_steps - done)
        logging.info("%s", format_log_line(done, num_steps, train_metrics, perf, eta,
                                           meter.peak_source))
        pending.clear()

    try:
        if start_step >= num_steps:
            logging.info("The run in %s has already completed %d of %d steps.", workdir,
                         start_step, num_steps)
        for step in range(start_step, num_steps):
            batch = shard_batch(mesh, batch_fn(step))
            state, metrics = train_step(state, batch, rng)
            done = step + 1
            pending.append((done, metrics, not first_step))
            if first_step:
                # The first step of a process compiles; time only what follows it.
                jax.block_until_ready(metrics)
                meter.reset()
                first_step = False
            if on_step is not None:
                on_step(done)

            is_last = done == num_steps
            if done % log_every == 0 or is_last:
                log(done)
            do_eval = eval_fn is not None and (is_last or (eval_every and done % eval_every == 0))
            do_checkpoint = is_last or (checkpoint_every and done % checkpoint_every == 0)
            if (do_eval or do_checkpoint) and pending:
                # Never evaluate or checkpoint a state that has gone non-finite.
                _check_finite([(s, jax.device_get(m)) for s, m, _ in pending], workdir)
            if do_eval:
                eval_metrics = dict(eval_fn(state))
                writer.write_scalars(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
                writer.flush()
                logging.info("step %d/%d | eval | %s", done, num_steps, " | ".join(
                    f"{name} {value:.4g}" for name, value in eval_metrics.items()))
            if do_checkpoint:
                extra = {"step": done, "metadata": metadata}
                if data_order is not None:
                    extra["data_position"] = data_order.position(done)
                checkpointer.save(done, state, extra)
            if do_eval or do_checkpoint:
                meter.reset()
        if eval_fn is not None and start_step >= num_steps:
            eval_metrics = dict(eval_fn(state))
        checkpointer.wait()
    finally:
        checkpointer.close()
        writer.close()

    return LoopResult(state=state, step=int(jax.device_get(state.step)),
                      train_metrics=train_metrics, eval_metrics=eval_metrics,
                      resumed_from=resumed_from)


def json_roundtrip(value: Any) -> Any:
    """Returns `value` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))
