"""Metric writing (TensorBoard and JSONL in the workdir), the run config file, and host-side
reduction of (sum, count) metrics.

Metric names are namespaced: `train/`, `eval/`, `ppo/`, `perf/`. `metrics.jsonl` contains one
JSON object per written step, {"step": s, "train/loss": ..., ...}. TensorBoard events go under
`tensorboard/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
import numpy as np
import tensorboardX

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"


def _as_float(name: str, value: Any) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"Metric {name!r} must be a scalar, got shape {array.shape}.")
    return float(array.reshape(()))


class MetricWriter:
    """Writes scalar metrics to `workdir/metrics.jsonl` and TensorBoard under `workdir/tensorboard`.

    Args:
      workdir: the run's folder (created when missing).
      purge_step: when a run resumes from a checkpoint, the first step it will write again.
        Records at or after this step, written before the interruption, are removed from the
        JSONL file and hidden in TensorBoard, so each step appears once.
    """

    def __init__(self, workdir: str | os.PathLike, purge_step: int | None = None):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / METRICS_FILE
        if purge_step is not None and self.path.exists():
            self._drop_records_from(purge_step)
        self._jsonl = self.path.open("a")
        self._tensorboard = tensorboardX.SummaryWriter(
            logdir=str(self.workdir / TENSORBOARD_DIR), purge_step=purge_step
        )

    def _drop_records_from(self, step: int) -> None:
        kept = []
        with self.path.open() as file:
            for line in file:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    # The last line of a killed run may be cut off; it is dropped.
                    continue
                if record.get("step", -1) < step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Writes one record; values are converted to Python floats (NaN is written as NaN)."""
        values = {name: _as_float(name, value) for name, value in scalars.items()}
        record = {"step": int(step), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, global_step=int(step))

    def flush(self) -> None:
        self._jsonl.flush()
        self._tensorboard.flush()

    def close(self) -> None:
        if not self._jsonl.closed:
            self._jsonl.close()
            self._tensorboard.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads back the records of `workdir/metrics.jsonl` in file order."""
    path = pathlib.Path(workdir) / METRICS_FILE
    records = []
    with path.open() as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON: {error}.") from error
    return records


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> pathlib.Path:
    """Writes `config` to `workdir/config.json` (atomically).

    When the file exists from an earlier start of the same run and the config differs, the
    new config replaces it and a warning names the changed fields.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    if path.exists():
        previous = path.read_text()
        if previous != text:
            changed = _changed_fields(json.loads(previous), json.loads(text))
            logging.warning(
                "The config differs from the one in %s (fields %s); resuming with the new one.",
                path, ", ".join(changed) or "(formatting only)",
            )
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changed = []
        for key in sorted(set(old) | set(new)):
            changed += _changed_fields(old.get(key), new.get(key), f"{prefix}{key}.")
        return changed
    return [] if old == new else [prefix.rstrip(".")]


def reduce_metrics(per_step: Iterable[Mapping[str, tuple[Any, Any]]]) -> dict[str, float]:
    """Reduces (sum, count) metrics of several steps to means: Σ sum / Σ count per name.

    A name with a total count of 0 gets NaN. Values may be device arrays; they are fetched
    here, so call this at log time and not after every step.
    """
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for metrics in per_step:
        for name, pair in metrics.items():
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise ValueError(f"Metric {name!r} must be a (sum, count) pair, got {pair!r}.")
            total, count = pair
            sums[name] = sums.get(name, 0.0) + _as_float(name, total)
            counts[name] = counts.get(name, 0.0) + _as_float(name, count)
    return {
        name: sums[name] / counts[name] if counts[name] else math.nan for name in sums
    }
