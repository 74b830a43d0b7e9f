"""Training a reward model: ranking loss with margin, evaluation, export, and the stage entry point.

Llama 2's reward models (Touvron et al. 2023, section 3.2.2) are the chat model with its
language-model head replaced by a scalar head, trained with the binary ranking loss with margin

  L = -log σ(r_θ(x, y_chosen) - r_θ(x, y_rejected) - m(level)),

averaged over the pairs of a batch, with m read from a margin table ("none", "small", "large";
an unknown level gets m = 0). The paper trains one epoch, 512 pairs per batch, peak learning
rate 1e-5 (5e-6 for 70B), cosine decay to 10% of the peak, 3% warm-up (at least 5 steps).

A comparison batch is a dict of tokens [B, 2, T] int32 (index 0 the chosen answer), mask
[B, 2, T] bool and level [B] int32, sliced from the arrays of `data.pack_comparisons`.

Entry points:
  - `train_and_evaluate(config, workdir)`: reads comparisons, holds out an evaluation split,
    mixes the training data for the model's kind, trains, evaluates, exports, and optionally
    measures the non-neural baselines on the same split.
  - `train_on_comparisons(...)`: trains on comparisons given in memory (the RLHF loop's
    simulated annotator supplies them).
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llama_rlhf import losses
from llama_rlhf import sharding as shd
from llama_rlhf.data.batching import pack_comparisons
from llama_rlhf.data.hh_rlhf import read_hh_rlhf_jsonl
from llama_rlhf.data.preferences import Comparison, ReadSummary, read_comparisons_jsonl
from llama_rlhf.data.tokenizer import Tokenizer, load_tokenizer
from llama_rlhf.model import LlamaConfig
from llama_rlhf.reward_model import evaluation
from llama_rlhf.reward_model.mixing import KINDS, mix_for_kind, split_held_out
from llama_rlhf.reward_model.scoring import score_pairs
from llama_rlhf.training import checkpoints
from llama_rlhf.training.loop import (
    DataOrder,
    make_eval_step,
    make_train_step,
    shard_batch,
    train_loop,
)
from llama_rlhf.training.metrics import save_config
from llama_rlhf.training.optim import make_optimizer
from llama_rlhf.training.state import create_train_state, train_state_shardings

log = logging.getLogger(__name__)

MODEL_DIR = "model"
EVAL_DIR = "eval"
COMPARISON_FILE = "comparison.md"
# Training batches are cut to the longest packed sequence, rounded up to this multiple.
LENGTH_MULTIPLE = 64
# The arrays of `pack_comparisons` that the steps read.
BATCH_KEYS = ("tokens", "mask", "level")


# ---------------------------------------------------------------------------------------------
# Loss.


def pair_loss(scores: jax.Array, levels: jax.Array, margin_table: str
              ) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """Computes the mean ranking loss of scored pairs and its (sum, count) metrics.

    Args:
      scores: [B, 2] rewards, column 0 the chosen answers.
      levels: [B] preference levels 0..4.
      margin_table: a key of `losses.MARGIN_TABLES`.

    Returns:
      (loss, metrics): loss is the mean over the batch of -log σ(r_c - r_r - m(level));
      metrics maps "loss", "accuracy" (r_c > r_r, ties wrong), "score_gap" (r_c - r_r),
      "chosen_score" and "rejected_score" to (sum over pairs, number of pairs).
    """
    chosen, rejected = scores[:, 0], scores[:, 1]
    margins = losses.margins_for_levels(levels, margin_table)
    per_pair = losses.ranking_loss(chosen, rejected, margins)
    count = jnp.asarray(per_pair.shape[0], jnp.float32)
    metrics = {
        "loss": (jnp.sum(per_pair), count),
        "accuracy": (jnp.sum((chosen > rejected).astype(jnp.float32)), count),
        "score_gap": (jnp.sum(chosen - rejected), count),
        "chosen_score": (jnp.sum(chosen), count),
        "rejected_score": (jnp.sum(rejected), count),
    }
    return jnp.mean(per_pair), metrics


def comparison_loss(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                    model_config: LlamaConfig, margin_table: str
                    ) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """Scores a comparison batch and returns its `pair_loss`; the loss function of the step.

    The model has no dropout, so `rng` is unused.
    """
    del rng
    scores = score_pairs(model_config, params, batch["tokens"], batch["mask"])
    return pair_loss(scores, batch["level"], margin_table)


def build_train_step(model_config: LlamaConfig, margin_table: str, *, mesh, state_shardings,
                     batch_size: int, schedule=None):
    """Returns the jitted reward-model train step (state, batch, rng) -> (state, metrics)."""
    if margin_table not in losses.MARGIN_TABLES:
        raise ValueError(f"Unknown margin table {margin_table!r}; expected one of "
                         f"{sorted(losses.MARGIN_TABLES)}.")
    loss_fn = functools.partial(comparison_loss, model_config=model_config,
                                margin_table=margin_table)
    return make_train_step(loss_fn, mesh=mesh, state_shardings=state_shardings,
                           batch_size=batch_size, schedule=schedule)


# ---------------------------------------------------------------------------------------------
# Data.


def _packed_length(lengths: np.ndarray, max_length: int) -> int:
    """Returns the longest sequence rounded up to LENGTH_MULTIPLE, at most max_length."""
    longest = int(lengths.max()) if lengths.size else 1
    return min(-(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, max_length)


def pack_for_training(comparisons: Sequence[Comparison], tokenizer: Tokenizer, max_length: int
                      ) -> dict[str, np.ndarray]:
    """Packs comparisons with `pack_comparisons` and cuts the padding every row shares.

    Returns:
      tokens [N, 2, T], mask [N, 2, T], level [N], lengths [N, 2] and truncated [N], with T the
      longest sequence rounded up to a multiple of 64 (at most max_length), so that short
      data does not pay for max_length.
    """
    packed = pack_comparisons(comparisons, tokenizer, max_length)
    length = _packed_length(packed["lengths"], max_length)
    return {
        "tokens": packed["tokens"][:, :, :length],
        "mask": packed["mask"][:, :, :length],
        "level": packed["level"],
        "lengths": packed["lengths"],
        "truncated": packed["truncated"],
    }


def load_comparisons(data_config: ml_collections.ConfigDict) -> list[Comparison]:
    """Reads the comparisons named by the data config (HH-RLHF and/or project JSONL files).

    Bad records are skipped and counted when `data_config.skip_invalid` is set; the counts are
    logged. `data_config.limit` > 0 keeps only the first `limit` comparisons.
    """
    comparisons: list[Comparison] = []
    if data_config.hh_rlhf_path:
        summary = ReadSummary()
        comparisons += read_hh_rlhf_jsonl(data_config.hh_rlhf_path,
                                          subset=data_config.hh_rlhf_subset,
                                          skip_invalid=data_config.skip_invalid, summary=summary)
        log.info("%s", summary)
    if data_config.comparisons_path:
        summary = ReadSummary()
        comparisons += read_comparisons_jsonl(data_config.comparisons_path,
                                              skip_invalid=data_config.skip_invalid,
                                              summary=summary)
        log.info("%s", summary)
    if not (data_config.hh_rlhf_path or data_config.comparisons_path):
        raise ValueError(
            "No training data: set config.data.hh_rlhf_path (an HH-RLHF JSONL file) or "
            "config.data.comparisons_path (comparisons in the project's JSONL format)."
        )
    if data_config.limit > 0:
        comparisons = comparisons[:data_config.limit]
    if not comparisons:
        raise ValueError("The configured data files contain no valid comparison.")
    return comparisons


# ---------------------------------------------------------------------------------------------
# Evaluation.


def make_scorer(model_config: LlamaConfig, *, mesh, param_shardings, batch_size: int):
    """Returns (params, packed arrays) -> (chosen scores [N], rejected scores [N]) on the host.

    The arrays are scored in batches of `batch_size` pairs. The last batch is filled up with
    copies of its first pair, whose scores are dropped, so that every batch has one shape.
    """
    step = make_eval_step(
        lambda params, batch: score_pairs(model_config, params, batch["tokens"], batch["mask"]),
        mesh=mesh, param_shardings=param_shardings, batch_size=batch_size)

    def score_all(params, packed: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        num = packed["tokens"].shape[0]
        parts = []
        for start in range(0, num, batch_size):
            index = np.arange(start, start + batch_size)
            index = np.where(index < num, index, start)
            batch = {key: packed[key][index] for key in ("tokens", "mask")}
            parts.append(np.asarray(jax.device_get(step(params, shard_batch(mesh, batch)))))
        scores = np.concatenate(parts)[:num]
        return scores[:, 0], scores[:, 1]

    return score_all


def _scalar_eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flattens `evaluate_scores` output into the scalars written as eval/ metrics."""
    scalars = {
        "accuracy": metrics["accuracy"],
        "score_gap": metrics["mean_score_gap"],
        "score_mean": metrics["score_mean"],
        "score_std": metrics["score_std"],
    }
    for name, entry in metrics["per_level"].items():
        if entry["pairs"]:
            scalars[f"accuracy_{name}"] = entry["accuracy"]
    return scalars


def _eval_rows(metrics: dict[str, Any], chosen: np.ndarray, rejected: np.ndarray,
               packed: Mapping[str, np.ndarray], is_safety: np.ndarray, title: str
               ) -> dict[str, dict[str, Any]]:
    """Per-level table rows: all held-out pairs, plus one row per prompt kind when both occur."""
    rows = {f"{title}, all held-out pairs": metrics}
    if is_safety.any() and (~is_safety).any():
        for name, selected in (("safety", is_safety), ("helpfulness", ~is_safety)):
            rows[f"{title}, {name} prompts"] = evaluation.evaluate_scores(
                chosen[selected], rejected[selected], packed["level"][selected])
    return rows


# ---------------------------------------------------------------------------------------------
# Training.


def _check_config(config: ml_collections.ConfigDict) -> None:
    if config.kind not in KINDS:
        raise ValueError(f"config.kind must be one of {KINDS}, got {config.kind!r}.")
    if config.margin_table not in losses.MARGIN_TABLES:
        raise ValueError(f"config.margin_table must be one of {sorted(losses.MARGIN_TABLES)}, "
                         f"got {config.margin_table!r}.")
    for name in ("batch_size", "eval_batch_size", "num_epochs"):
        if config[name] <= 0:
            raise ValueError(f"config.{name} must be positive, got {config[name]}.")
    if config.data.max_length < 2:
        raise ValueError(f"config.data.max_length must be at least 2, got "
                         f"{config.data.max_length}.")


def train_on_comparisons(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    train_comparisons: Sequence[Comparison],
    eval_comparisons: Sequence[Comparison],
    *,
    tokenizer: Tokenizer,
    init_from: str | None = None,
) -> dict[str, Any]:
    """Trains a reward model on comparisons in memory, evaluates it and exports it.

    The comparisons are used as given: no mixing and no split happen here. Rerunning with the
    same workdir, config and comparisons resumes from the latest checkpoint.

    Args:
      config: a reward-model config (`configs/reward_model.py`); this reads kind, seed,
        model_overrides, margin_table, batch_size, eval_batch_size, num_epochs, optimizer,
        mesh, loop and data.max_length.
      workdir: the run's folder; the model is exported to `workdir/model`, the evaluation
        report goes to `workdir/eval`.
      train_comparisons: training pairs.
      eval_comparisons: held-out pairs, at least one; their score statistics are stored with
        the model for whitening.
      tokenizer: the tokenizer of the model.
      init_from: the starting point, anything `training.checkpoints.load_initial_params`
        accepts; `config.init_from` when None.

    Returns:
      {"eval": metrics of `evaluation.evaluate_scores`, "train": the last logged train
      metrics, "steps", "train_pairs", "eval_pairs", "sequence_length", "train_seconds",
      "model_dir", "eval_dir"}.
    """
    _check_config(config)
    workdir = pathlib.Path(workdir)
    init_from = init_from or config.init_from
    if not init_from:
        raise ValueError("config.init_from is empty; set it to a model folder, a Hugging Face "
                         "folder, a llama2.c .bin file or 'random:<variant>'.")
    if not eval_comparisons:
        raise ValueError("train_on_comparisons needs at least one held-out comparison; its scores "
                         "give the mean and std stored for whitening.")
    max_length = int(config.data.max_length)
    train = pack_for_training(train_comparisons, tokenizer, max_length)
    held_out = pack_for_training(eval_comparisons, tokenizer, max_length)
    sequence_length = train["tokens"].shape[-1]
    log.info("Reward model data: %d training pairs (%d truncated to %d tokens), %d held-out "
             "pairs; batches of %d tokens per sequence.", len(train_comparisons),
             int(train["truncated"].sum()), max_length, len(eval_comparisons), sequence_length)

    mesh = shd.create_mesh(dict(config.mesh))
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    overrides = dict(config.model_overrides) or None
    model_config = checkpoints.initial_model_config(init_from, model_config_overrides=overrides)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model from "
                         f"{init_from} embeds only {model_config.vocab_size}.")

    order = DataOrder(num_examples=len(train_comparisons), batch_size=int(config.batch_size),
                      seed=int(config.seed))
    num_steps = order.steps_per_epoch * int(config.num_epochs)
    tx, schedule = make_optimizer(config.optimizer, num_steps)
    abstract_state, state_shardings = train_state_shardings(model_config, "scalar", tx, mesh)
    train_step = build_train_step(model_config, config.margin_table, mesh=mesh,
                                  state_shardings=state_shardings,
                                  batch_size=int(config.batch_size), schedule=schedule)

    def init_state():
        # Called only without a checkpoint to resume, so a resume never loads these weights.
        loaded = checkpoints.load_initial_params(init_from, head="scalar", rng=init_rng,
                                                 mesh=mesh, model_config_overrides=overrides)
        state, _ = create_train_state(model_config, "scalar", tx, mesh, init_rng,
                                      params=loaded.params)
        return state

    def batch_fn(step: int) -> dict[str, np.ndarray]:
        index = order.indices(step)
        return {key: train[key][index] for key in BATCH_KEYS}

    score_all = make_scorer(model_config, mesh=mesh, param_shardings=state_shardings.params,
                            batch_size=int(config.eval_batch_size))
    last_scores: dict[str, Any] = {}

    def eval_fn(state) -> dict[str, float]:
        chosen, rejected = score_all(state.params, held_out)
        last_scores.update(step=int(jax.device_get(state.step)), chosen=chosen,
                           rejected=rejected)
        return _scalar_eval_metrics(
            evaluation.evaluate_scores(chosen, rejected, held_out["level"]))

    start = time.perf_counter()
    result = train_loop(
        workdir=workdir,
        loop_config=config.loop,
        num_steps=num_steps,
        abstract_state=abstract_state,
        init_state=init_state,
        train_step=train_step,
        batch_fn=batch_fn,
        rng=step_rng,
        mesh=mesh,
        eval_fn=eval_fn,
        flops_per_token=model_config.flops_per_token(sequence_length),
        data_order=order,
        checkpoint_metadata={
            "stage": "reward_model", "kind": config.kind, "init_from": str(init_from),
            "train_pairs": len(train_comparisons), "eval_pairs": len(eval_comparisons),
            "sequence_length": int(sequence_length),
        },
    )
    train_seconds = time.perf_counter() - start

    chosen, rejected = last_scores["chosen"], last_scores["rejected"]
    title = f"{config.kind} RM"
    eval_dir = workdir / EVAL_DIR
    metrics = evaluation.write_evaluation(eval_dir, chosen, rejected, held_out["level"],
                                          title=title)
    is_safety = np.array([c.is_safety_prompt for c in eval_comparisons], bool)
    rows = _eval_rows(metrics, chosen, rejected, held_out, is_safety, title)
    if len(rows) > 1:
        evaluation.write_atomic(eval_dir / "accuracy_table.md",
                                evaluation.accuracy_table_markdown(rows))
    log.info("Held-out accuracy of the %s reward model after %d steps: %.4f over %d pairs.\n%s",
             config.kind, result.step, metrics["accuracy"], metrics["pairs"],
             evaluation.accuracy_table_markdown(rows))

    model_dir = checkpoints.save_model(
        workdir / MODEL_DIR, model_config, result.state.params, head="scalar",
        metadata={
            "kind": config.kind,
            "score_mean": metrics["score_mean"],
            "score_std": metrics["score_std"],
            "eval": metrics,
            "margin_table": config.margin_table,
            "max_length": max_length,
            "pad_id": int(tokenizer.pad_id),
            "train_pairs": len(train_comparisons),
            "steps": int(result.step),
            "init_from": str(init_from),
        })
    return {
        "eval": metrics,
        "train": dict(result.train_metrics),
        "steps": int(result.step),
        "train_pairs": len(train_comparisons),
        "eval_pairs": len(eval_comparisons),
        "sequence_length": int(sequence_length),
        "train_seconds": train_seconds,
        "model_dir": str(model_dir),
        "eval_dir": str(eval_dir),
    }


# ---------------------------------------------------------------------------------------------
# Baselines.


def measure_baselines(train_comparisons: Sequence[Comparison],
                      eval_comparisons: Sequence[Comparison], tokenizer: Tokenizer
                      ) -> dict[str, dict[str, Any]]:
    """Evaluates the length and TF-IDF baselines on the held-out pairs.

    Answer lengths are counted in tokens of `tokenizer`; the TF-IDF model reads the answer
    texts and is trained on `train_comparisons`.

    Returns:
      method name -> metrics of `evaluation.evaluate_scores`.
    """
    from llama_rlhf import baselines

    levels = np.array([int(c.level) for c in eval_comparisons], np.int32)
    chosen_lengths = [len(tokenizer.encode(c.chosen)) for c in eval_comparisons]
    rejected_lengths = [len(tokenizer.encode(c.rejected)) for c in eval_comparisons]
    results = {}
    for prefer in baselines.LENGTH_PREFERENCES:
        results[f"{prefer} answer wins"] = evaluation.evaluate_scores(
            baselines.length_scores(chosen_lengths, prefer),
            baselines.length_scores(rejected_lengths, prefer), levels)
    tfidf = baselines.TfidfPreferenceModel().fit([c.chosen for c in train_comparisons],
                                                 [c.rejected for c in train_comparisons])
    name = f"TF-IDF logistic regression (C = {tfidf.regularization:g})"
    results[name] = evaluation.evaluate_scores(
        tfidf.score([c.chosen for c in eval_comparisons]),
        tfidf.score([c.rejected for c in eval_comparisons]), levels)
    return results


# ---------------------------------------------------------------------------------------------
# Stage entry point.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict[str, Any]:
    """Runs the reward-model stage of a config from `configs/reward_model.py`.

    Steps:
      1. Save the config, load the tokenizer and the comparisons.
      2. Hold out `data.eval_fraction` of them at random, or read `data.eval_path`.
      3. Mix the rest for the model's kind (`mixing.mix_for_kind`) when `data.mix` is set.
      4. Train, evaluate and export with `train_on_comparisons`.
      5. With `baselines` set, measure the length and TF-IDF baselines on the same split and
         write the comparison table to `workdir/comparison.md`.

    Returns:
      The dict of `train_on_comparisons`, plus "baselines" (method -> metrics) and
      "comparison_table" (markdown) when baselines are measured.
    """
    _check_config(config)
    workdir = pathlib.Path(workdir)
    save_config(workdir, config)
    if not config.data.tokenizer:
        raise ValueError("config.data.tokenizer is empty; set it to a SentencePiece "
                         "tokenizer.model file or a Hugging Face tokenizer folder.")
    tokenizer = load_tokenizer(config.data.tokenizer)

    comparisons = load_comparisons(config.data)
    if config.data.eval_path:
        train_pool = comparisons
        held_out = read_comparisons_jsonl(config.data.eval_path,
                                          skip_invalid=config.data.skip_invalid)
    else:
        train_pool, held_out = split_held_out(comparisons, config.data.eval_fraction,
                                              seed=config.data.split_seed)
    if config.data.mix:
        train = mix_for_kind(train_pool, config.kind, seed=config.seed,
                             other_per_own=config.data.other_per_own,
                             safety_fraction=config.data.safety_fraction)
    else:
        train = list(train_pool)
    num_safety = sum(c.is_safety_prompt for c in train)
    log.info("Training mixture of the %s reward model: %d pairs (%d safety, %d helpfulness) "
             "from a pool of %d; %d held-out pairs.", config.kind, len(train), num_safety,
             len(train) - num_safety, len(train_pool), len(held_out))

    result = train_on_comparisons(config, workdir, train, held_out, tokenizer=tokenizer)

    if config.baselines:
        rows = {f"reward model ({config.kind}, {result['steps']} steps)": result["eval"]}
        rows.update(measure_baselines(train, held_out, tokenizer))
        table = evaluation.comparison_table_markdown(rows)
        evaluation.write_atomic(workdir / COMPARISON_FILE, table)
        log.info("Held-out accuracy of the reward model and the baselines:\n%s", table)
        result["baselines"] = {name: metrics for name, metrics in rows.items()
                               if not name.startswith("reward model")}
        result["comparison_table"] = table
    return result
