"""Evaluation of a reward model on held-out comparisons, from its scores.

Everything here runs on the host in numpy, after the model has scored the chosen and the rejected
answer of each pair: accuracy overall and per preference level (a table in the layout of Llama 2's
Table 8, Touvron et al. 2023), the mean score gap, the score distribution (PNG and JSON), and the
score mean and standard deviation that are stored with an exported reward model for whitening.
A tie between the two scores counts as a wrong ranking everywhere, so a constant model scores 0.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llama_rlhf import losses

# Column titles for `losses.LEVEL_NAMES`, in the same order.
LEVEL_TITLES = (
    "Significantly Better",
    "Better",
    "Slightly Better",
    "Negligibly Better",
    "Unknown",
)

HISTOGRAM_BINS = 40


def evaluate_scores(
    chosen_scores: Sequence[float] | np.ndarray,
    rejected_scores: Sequence[float] | np.ndarray,
    levels: Sequence[int] | np.ndarray,
) -> dict[str, Any]:
    """Computes the pairwise metrics of a reward model from the scores of held-out pairs.

    A pair is ranked correctly when r_chosen > r_rejected; ties are wrong.

    Args:
      chosen_scores: score of the chosen answer of each pair, [N].
      rejected_scores: score of the rejected answer of each pair, [N].
      levels: preference level of each pair, integers 0..4 (`losses.LEVEL_NAMES`), [N].

    Returns:
      A JSON-ready dict with
        "pairs": N; "ties": pairs with r_chosen == r_rejected;
        "accuracy": correct / N over all pairs (None when N is 0);
        "per_level": {level name: {"pairs", "correct", "accuracy" (None without pairs)}};
        "mean_score_gap": mean of r_chosen - r_rejected;
        "chosen_mean", "rejected_mean": mean score of each side;
        "score_mean", "score_std": mean and population standard deviation of the 2N scores
          of both sides together, the statistics used to whiten this model's scores later.

    Raises:
      ValueError: when the three inputs differ in shape, are not one-dimensional, contain
        non-finite scores, or contain levels outside 0..4.
    """
    chosen = np.asarray(chosen_scores, np.float64)
    rejected = np.asarray(rejected_scores, np.float64)
    levels = np.asarray(levels)
    if chosen.ndim != 1 or chosen.shape != rejected.shape or chosen.shape != levels.shape:
        raise ValueError(
            "Expected one-dimensional chosen scores, rejected scores and levels of equal length, "
            f"got shapes {chosen.shape}, {rejected.shape} and {levels.shape}."
        )
    if not (np.all(np.isfinite(chosen)) and np.all(np.isfinite(rejected))):
        raise ValueError("Reward model scores contain NaN or inf; the model diverged.")
    if levels.size and not np.issubdtype(levels.dtype, np.integer):
        raise ValueError(f"Expected integer preference levels, got dtype {levels.dtype}.")
    invalid = sorted(set(levels[(levels < 0) | (levels > losses.UNKNOWN)].tolist()))
    if invalid:
        raise ValueError(
            f"Invalid preference levels {invalid}; expected integers 0..{losses.UNKNOWN}."
        )

    correct = chosen > rejected
    num_pairs = int(chosen.size)
    per_level = {}
    for level, name in enumerate(losses.LEVEL_NAMES):
        in_level = levels == level
        count = int(np.sum(in_level))
        hits = int(np.sum(correct & in_level))
        per_level[name] = {
            "pairs": count,
            "correct": hits,
            "accuracy": hits / count if count else None,
        }

    both = np.concatenate([chosen, rejected])
    return {
        "pairs": num_pairs,
        "ties": int(np.sum(chosen == rejected)),
        "accuracy": float(np.mean(correct)) if num_pairs else None,
        "per_level": per_level,
        "mean_score_gap": float(np.mean(chosen - rejected)) if num_pairs else None,
        "chosen_mean": float(np.mean(chosen)) if num_pairs else None,
        "rejected_mean": float(np.mean(rejected)) if num_pairs else None,
        "score_mean": float(np.mean(both)) if num_pairs else None,
        "score_std": float(np.std(both)) if num_pairs else None,
    }


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100.0 * value:.1f}"


def accuracy_table_markdown(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Formats per-level accuracies as a markdown table in the layout of Llama 2's Table 8.

    Args:
      rows: row title (a model or a test set) -> the dict returned by `evaluate_scores`.

    Returns:
      The table: one row per entry with the accuracy in percent for each preference level and
      overall, followed by one row of pair counts per entry. Levels without pairs show "–".
    """
    header = "| | " + " | ".join(LEVEL_TITLES) + " | Overall |"
    separator = "|---|" + "---:|" * (len(LEVEL_TITLES) + 1)
    lines = [header, separator]
    for title, result in rows.items():
        cells = [_percent(result["per_level"][name]["accuracy"]) for name in losses.LEVEL_NAMES]
        lines.append(f"| {title}: accuracy (%) | " + " | ".join(cells)
                     + f" | {_percent(result['accuracy'])} |")
    for title, result in rows.items():
        cells = [str(result["per_level"][name]["pairs"]) for name in losses.LEVEL_NAMES]
        lines.append(f"| {title}: pairs | " + " | ".join(cells) + f" | {result['pairs']} |")
    return "\n".join(lines) + "\n"


def comparison_table_markdown(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Formats the held-out accuracy of several scorers (a reward model, baselines) side by side.

    Args:
      rows: method name -> the dict returned by `evaluate_scores` on the same pairs.

    Returns:
      A markdown table with the accuracy in percent, the number of pairs and the number of
      ties (counted as wrong) of each method.
    """
    lines = [
        "| method | held-out accuracy (%) | pairs | ties (counted wrong) |",
        "|---|---:|---:|---:|",
    ]
    for name, result in rows.items():
        lines.append(
            f"| {name} | {_percent(result['accuracy'])} | {result['pairs']} | {result['ties']} |"
        )
    return "\n".join(lines) + "\n"


def score_histogram(
    chosen_scores: np.ndarray, rejected_scores: np.ndarray, bins: int = HISTOGRAM_BINS
) -> dict[str, list[float] | list[int]]:
    """Counts the chosen and the rejected scores over shared bin edges.

    Returns:
      {"bin_edges": [bins + 1], "chosen_counts": [bins], "rejected_counts": [bins]}.
    """
    chosen = np.asarray(chosen_scores, np.float64)
    rejected = np.asarray(rejected_scores, np.float64)
    edges = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=bins)
    return {
        "bin_edges": edges.tolist(),
        "chosen_counts": np.histogram(chosen, bins=edges)[0].tolist(),
        "rejected_counts": np.histogram(rejected, bins=edges)[0].tolist(),
    }


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes a file under a temporary name in the same folder, then renames it into place."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as file:
            file.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise


def _write_histogram_png(path: pathlib.Path, histogram: Mapping[str, list], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(histogram["bin_edges"])
    widths = np.diff(edges)
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    axes.bar(edges[:-1], histogram["chosen_counts"], width=widths, align="edge", alpha=0.6,
             label="chosen")
    axes.bar(edges[:-1], histogram["rejected_counts"], width=widths, align="edge", alpha=0.6,
             label="rejected")
    axes.set_xlabel("reward model score")
    axes.set_ylabel("answers")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        figure.savefig(tmp_name, format="png", dpi=100)
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    finally:
        plt.close(figure)


def write_evaluation(
    directory: str | os.PathLike,
    chosen_scores: np.ndarray,
    rejected_scores: np.ndarray,
    levels: np.ndarray,
    *,
    title: str = "reward model",
) -> dict[str, Any]:
    """Evaluates scores and writes the report files of one evaluation into `directory`.

    Files written: `eval.json` (the metrics of `evaluate_scores`), `accuracy_table.md` (the
    per-level table), `scores.npz` (the scores and levels of every pair),
    `score_histogram.json` and `score_histogram.png` (the score distribution of chosen and
    rejected answers).

    Returns:
      The metrics of `evaluate_scores`.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chosen = np.asarray(chosen_scores, np.float32)
    rejected = np.asarray(rejected_scores, np.float32)
    levels = np.asarray(levels, np.int32)
    metrics = evaluate_scores(chosen, rejected, levels)

    write_atomic(directory / "eval.json", json.dumps(metrics, indent=2) + "\n")
    write_atomic(directory / "accuracy_table.md", accuracy_table_markdown({title: metrics}))
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".npz", delete=False) as file:
        np.savez(file, chosen=chosen, rejected=rejected, levels=levels)
    os.replace(file.name, directory / "scores.npz")
    if metrics["pairs"]:
        histogram = score_histogram(chosen, rejected)
        write_atomic(directory / "score_histogram.json", json.dumps(histogram) + "\n")
        _write_histogram_png(directory / "score_histogram.png", histogram,
                             f"{title}: held-out scores")
    return metrics
