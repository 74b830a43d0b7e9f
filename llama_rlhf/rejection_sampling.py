"""Rejection-sampling fine-tuning, the first RLHF method of Llama 2-Chat.

Touvron et al. 2023 ("Llama 2: Open Foundation and Fine-Tuned Chat Models", arXiv:2307.09288,
section 3.2.3) sample K answers per prompt from the latest model and score each with the best
reward model available. The best answer per prompt becomes the new gold standard, and the
model is fine-tuned on the kept answers like SFT. One call of `run_rejection_sampling` does
that:

  1. Sampling. Prompts are encoded in the chat format and sampled in batches: K samples per
     prompt at the configured temperature (`sampling.Sampler`). Each prompt + response is
     scored by the reward models. With a helpfulness and a safety model the score is Llama 2's
     gated reward R_c: σ(safety score) when the prompt is a safety prompt or σ(safety score)
     < 0.15, else σ(helpfulness score). With a helpfulness model only it is σ(helpfulness
     score). Each finished batch is written to `samples/batch_<index>.json`.
  2. Selection. The best sample per prompt is kept (the argmax of the K scores). Samples that
     hit `max_new_tokens` without EOS, and empty answers, are not eligible by default, because
     fine-tuning on them would teach the model to stop mid-sentence.
  3. Pooling (`selection.pool_previous`, on in the configs). Llama 2 selected only among the
     samples of the current iteration up to RLHF V3, saw regressions, and from then on kept
     the best answer per prompt among the samples of all earlier iterations too. Here the
     selections of earlier runs (their `selected.jsonl`) join the pool and the best per
     prompt overall is kept, over the union of their prompts and this run's. Scores of
     different reward-model versions are not comparable, so by default
     (`selection.rescore_previous`) every pooled answer, this run's included, is rescored
     from its text with this run's reward models. Without rescoring the stored scores are
     compared as they are.
  4. The selected set is written to `selected.jsonl`: one dialogue per line (the prompt's
     messages and the selected answer) with its score, reward models and iteration. The SFT
     stage reads this file as is (`sft.read_dialogues_jsonl`).
  5. Fine-tuning. `sft.train_on_examples` fine-tunes `policy_init` on the selected set with the
     loss on the selected answer's tokens only, under `finetune/`; the result is exported to
     `model/`.
  6. Best-of-N curves. For N = 1..K, the expected maximum and median score among N of the K
     samples, averaged over prompts (Llama 2's Figure 7), go to `best_of_n.json` and
     `best_of_n.png`. The gap between the two is what selection can gain. The curves use all
     samples, eligible or not.

Llama 2 sampled only with its 70B model and fine-tuned the smaller models on the 70B model's
selections, so `sampling_policy` may differ from the policy that is fine-tuned. On the
synthetic world (the tiny config), `train_and_evaluate` also measures the samples, the
selected answers and the policy before and after fine-tuning with the world's gold scorer.

NOTE: a selected answer is stored as text and tokenized again for fine-tuning and rescoring,
which can give other token ids than the sampled ones where the tokenizer does not round-trip.

Resume: batch files are written atomically and `samples/manifest.json` records the settings
they were drawn with (prompts, policy, reward models, sampling and selection settings), so a
rerun with the same workdir samples only the missing batches and raises if the settings
changed. The randomness of batch b is a function of (seed, iteration, b) alone, so a resumed
run draws what an uninterrupted one would. The fine-tuning resumes from its checkpoints, and
a finished run returns its `summary.json` without recomputing anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import matplotlib
import ml_collections
import numpy as np
import tqdm

from llama_rlhf import losses, sft
from llama_rlhf import sampling as sampling_lib
from llama_rlhf import sharding as shd
from llama_rlhf.data import chat
from llama_rlhf.data.batching import left_pad
from llama_rlhf.data.preferences import read_jsonl_records
from llama_rlhf.data.tokenizer import Tokenizer, load_tokenizer
from llama_rlhf.ppo import Prompt, gate_scores, read_prompts_jsonl
from llama_rlhf.reward_model.scoring import RewardModel
from llama_rlhf.training.checkpoints import MODEL_FILE, load_initial_params
from llama_rlhf.training.metrics import save_config

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
MANIFEST_FILE = "manifest.json"
SELECTED_FILE = "selected.jsonl"
CURVES_FILE = "best_of_n.json"
PLOT_FILE = "best_of_n.png"
SUMMARY_FILE = "summary.json"
FINETUNE_DIR = "finetune"
MODEL_DIR = "model"


# ---------------------------------------------------------------------------------------------
# Files.


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to a temporary file next to `path`, then renames it over `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(location: str | os.PathLike | None) -> dict[str, Any] | None:
    """Describes a model location for the manifest: its path, and the SHA-256 of its
    model.json when it is a project model directory, so that a model re-exported to the same
    path counts as another model."""
    if location is None:
        return None
    location = str(location)
    description: dict[str, Any] = {"path": location}
    model_file = pathlib.Path(location) / MODEL_FILE
    if model_file.is_file():
        description["model_json_sha256"] = file_sha256(model_file)
    return description


# ---------------------------------------------------------------------------------------------
# Prompts.


def prompt_key(messages: Sequence[chat.Message]) -> str:
    """Returns a stable identifier of a prompt: a SHA-256 over its roles and contents.

    Pooling matches answers of different iterations by this key, so the same prompt text
    gets the same key in every run.
    """
    canonical = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def as_prompt(prompt: Any) -> Prompt:
    """Converts a `ppo.Prompt` or a synthetic-world `WorldPrompt` to a `ppo.Prompt`.

    Raises:
      TypeError: the prompt is of another type, or it is given as token ids (a selected
        answer is stored as a dialogue, which needs the prompt's messages).
    """
    if isinstance(prompt, Prompt):
        converted = prompt
    elif hasattr(prompt, "messages") and hasattr(prompt, "is_safety_prompt"):
        converted = Prompt(tuple(prompt.messages), bool(prompt.is_safety_prompt))
    else:
        raise TypeError(f"Expected a ppo.Prompt or a WorldPrompt, got {type(prompt).__name__}.")
    if not isinstance(converted.dialog[0], chat.Message):
        raise TypeError(
            "Rejection sampling needs prompts given as chat messages, not token ids, because the "
            "selected answers are stored as dialogues."
        )
    return converted


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """The prompts of one run, encoded, without duplicates and without over-long prompts.

    Attributes:
      prompts: the kept prompts, in input order.
      ids: the chat-format token ids of each kept prompt.
      keys: `prompt_key` of each kept prompt.
      num_too_long: prompts dropped because they have more than `max_prompt_length` tokens.
      num_duplicates: prompts dropped because an earlier prompt has the same messages.
    """

    prompts: tuple[Prompt, ...]
    ids: tuple[tuple[int, ...], ...]
    keys: tuple[str, ...]
    num_too_long: int
    num_duplicates: int

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        """SHA-256 over the keys and safety flags, in order."""
        digest = hashlib.sha256()
        for prompt, key in zip(self.prompts, self.keys, strict=True):
            digest.update(f"{key}:{int(prompt.is_safety_prompt)}\n".encode())
        return digest.hexdigest()


def prepare_prompts(
    prompts: Sequence[Any], tokenizer: Tokenizer, max_prompt_length: int, max_prompts: int = 0
) -> PromptSet:
    """Encodes prompts, dropping duplicates and prompts longer than `max_prompt_length`.

    Cutting a prompt would remove its BOS and [INST] tags, so long prompts are dropped and
    counted instead.

    Args:
      prompts: `ppo.Prompt`s or `WorldPrompt`s whose dialog ends with a user message.
      tokenizer: the policy's tokenizer.
      max_prompt_length: the maximum number of tokens of a kept prompt.
      max_prompts: use only the first `max_prompts` prompts (0: all).

    Raises:
      ValueError: there are no prompts, or none is short enough.
    """
    if not prompts:
        raise ValueError("Rejection sampling got no prompts.")
    if max_prompts:
        prompts = prompts[:max_prompts]
    kept, ids, keys, seen = [], [], [], set()
    num_too_long = num_duplicates = 0
    for prompt in prompts:
        prompt = as_prompt(prompt)
        key = prompt_key(prompt.dialog)
        if key in seen:
            num_duplicates += 1
            continue
        encoded = prompt.encode(tokenizer)
        if len(encoded) > max_prompt_length:
            num_too_long += 1
            continue
        seen.add(key)
        kept.append(prompt)
        ids.append(tuple(encoded))
        keys.append(key)
    if not kept:
        raise ValueError(
            f"All {len(prompts)} prompts are longer than max_prompt_length "
            f"({max_prompt_length} tokens) or duplicates; raise sampling.max_prompt_length."
        )
    if num_too_long:
        logger.warning("Dropped %d of %d prompts longer than %d tokens.", num_too_long,
                       len(prompts), max_prompt_length)
    if num_duplicates:
        logger.info("Dropped %d of %d prompts that repeat an earlier prompt.", num_duplicates,
                    len(prompts))
    return PromptSet(tuple(kept), tuple(ids), tuple(keys), num_too_long, num_duplicates)


# ---------------------------------------------------------------------------------------------
# Scoring.


class RewardScorer:
    """Scores prompt + response token ids with Llama 2's gated reward.

    score = R_c = σ(s) if the prompt is a safety prompt or σ(s) < threshold, else σ(h), with h
    and s the raw helpfulness and safety reward-model outputs (`ppo.gate_scores`); without a
    safety model, score = σ(h).

    Args:
      helpfulness: the helpfulness reward model.
      safety: the safety reward model, or None.
      threshold: the calibrated safety score below which the safety reward is used.
      batch_size: sequences per reward-model forward pass.
      mesh: when given, scoring runs under `jax.set_mesh(mesh)`.
      sources: the reward models' locations, stored with every score.
    """

    def __init__(self, helpfulness: RewardModel, safety: RewardModel | None, *,
                 threshold: float = losses.SAFETY_THRESHOLD, batch_size: int = 32, mesh=None,
                 sources: Mapping[str, str | None] | None = None):
        self.helpfulness = helpfulness
        self.safety = safety
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)
        self.mesh = mesh
        self.sources = dict(sources or {})

    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
              is_safety_prompt: Sequence[bool]) -> dict[str, np.ndarray]:
        """Scores each prompt followed by its response.

        Returns:
          float arrays [B] "score" (R_c), "helpfulness" and "safety" (raw outputs; safety is
          NaN without a safety model), and bool [B] "used_safety".
        """
        def run():
            helpfulness = self.helpfulness.score_responses(
                prompt_ids, response_ids, batch_size=self.batch_size)
            safety = None
            if self.safety is not None:
                safety = self.safety.score_responses(
                    prompt_ids, response_ids, batch_size=self.batch_size)
            return helpfulness, safety

        if self.mesh is None:
            helpfulness, safety = run()
        else:
            with jax.set_mesh(self.mesh):
                helpfulness, safety = run()
        gated = gate_scores(helpfulness, safety, np.asarray(is_safety_prompt, bool),
                            self.threshold)
        return {
            "score": gated.gated.astype(np.float64),
            "helpfulness": np.asarray(helpfulness, np.float64),
            "safety": (np.full(len(helpfulness), np.nan) if safety is None
                       else np.asarray(safety, np.float64)),
            "used_safety": gated.used_safety,
        }


def load_reward_scorer(reward_models: Mapping[str, str | os.PathLike | None],
                       tokenizer: Tokenizer, config: ml_collections.ConfigDict, mesh
                       ) -> RewardScorer:
    """Loads the helpfulness (required) and safety (optional) reward models of `reward_models`."""
    if not reward_models.get("helpfulness"):
        raise ValueError("reward_models['helpfulness'] is required for rejection sampling.")
    unknown = sorted(set(reward_models) - {"helpfulness", "safety"})
    if unknown:
        raise ValueError(f"Unknown reward model names {unknown}; expected 'helpfulness' and "
                         "optionally 'safety'.")
    models = {}
    for name in ("helpfulness", "safety"):
        location = reward_models.get(name)
        if not location:
            models[name] = None
            continue
        model = RewardModel.load(location, mesh=mesh, pad_id=tokenizer.pad_id)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"The {name} reward model in {location} has {model.config.vocab_size} token ids, "
                f"fewer than the tokenizer {tokenizer.source} ({tokenizer.vocab_size}); the "
                "reward models must share the policy's tokenizer."
            )
        models[name] = model
    return RewardScorer(
        models["helpfulness"], models["safety"],
        threshold=float(config.selection.safety_threshold),
        batch_size=int(config.sampling.score_batch_size), mesh=mesh,
        sources={name: None if not reward_models.get(name) else str(reward_models[name])
                 for name in ("helpfulness", "safety")},
    )


# ---------------------------------------------------------------------------------------------
# Selection: pure functions.


def select_best(scores: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
    """Returns the index of the best eligible sample of each prompt, -1 where none is eligible.

    best[p] = argmax_k {scores[p, k] : eligible[p, k]}; ties go to the lowest k.

    Args:
      scores: [P, K] sample scores.
      eligible: bool [P, K]; all True when None.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"Expected scores of shape [prompts, samples], got {scores.shape}.")
    eligible = np.ones(scores.shape, bool) if eligible is None else np.asarray(eligible, bool)
    if eligible.shape != scores.shape:
        raise ValueError(f"eligible has shape {eligible.shape}, expected {scores.shape}.")
    masked = np.where(eligible, scores, -np.inf)
    best = np.argmax(masked, axis=1)
    return np.where(eligible.any(axis=1), best, -1)


@dataclasses.dataclass(frozen=True)
class Selection:
    """One selected answer: a line of `selected.jsonl`.

    Attributes:
      messages: the prompt's messages followed by the selected assistant answer.
      is_safety_prompt: whether the prompt is tagged as possibly unsafe (it decides the gate).
      score: the selection score R_c (see `RewardScorer`) under `reward_models`.
      helpfulness_score: the raw helpfulness reward-model output.
      safety_score: the raw safety reward-model output, None without a safety model.
      used_safety: whether R_c is the safety reward.
      iteration: the RLHF iteration whose policy sampled the answer.
      reward_models: {"helpfulness": location, "safety": location or None} that gave `score`.
      sample_index: which of the prompt's samples it was, and num_samples: out of how many.
    """

    messages: tuple[chat.Message, ...]
    is_safety_prompt: bool
    score: float
    helpfulness_score: float | None = None
    safety_score: float | None = None
    used_safety: bool | None = None
    iteration: int | None = None
    reward_models: Mapping[str, str | None] | None = None
    sample_index: int | None = None
    num_samples: int | None = None

    @property
    def prompt(self) -> tuple[chat.Message, ...]:
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        return self.messages[-1].content

    @property
    def key(self) -> str:
        return prompt_key(self.prompt)

    def to_json(self) -> dict[str, Any]:
        record = sft.dialogue_to_json(self.messages)
        record.update({
            "is_safety_prompt": self.is_safety_prompt,
            "prompt_key": self.key,
            "score": self.score,
            "helpfulness_score": self.helpfulness_score,
            "safety_score": self.safety_score,
            "used_safety": self.used_safety,
            "iteration": self.iteration,
            "reward_models": None if self.reward_models is None else dict(self.reward_models),
            "sample_index": self.sample_index,
            "num_samples": self.num_samples,
        })
        return record


def _optional_number(record: Mapping[str, Any], name: str, kind: type) -> Any:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise chat.ChatFormatError(
            "invalid_record", f"field {name!r} is {value!r}, expected a number or null")
    return kind(value)


def selection_from_json(record: Any, *, require_score: bool = True) -> Selection:
    """Parses one line of a selected set (format of `Selection.to_json`).

    Only "messages" (ending with the assistant's answer) and "is_safety_prompt" are required,
    and "score" unless `require_score` is False; other fields may be missing or null.

    Raises:
      ChatFormatError: the record breaks the format; the message says which field.
    """
    messages = sft.dialogue_from_json(record)
    is_safety = record.get("is_safety_prompt")
    if not isinstance(is_safety, bool):
        raise chat.ChatFormatError(
            "invalid_record", f"field 'is_safety_prompt' is {is_safety!r}, expected true or false")
    score = _optional_number(record, "score", float)
    if score is None:
        if require_score:
            raise chat.ChatFormatError(
                "invalid_record", "field 'score' is missing; comparing stored scores needs one "
                "(or set selection.rescore_previous)")
        score = math.nan
    elif not math.isfinite(score):
        raise chat.ChatFormatError("invalid_record", f"field 'score' is {score}, expected finite")
    reward_models = record.get("reward_models")
    if reward_models is not None and not isinstance(reward_models, dict):
        raise chat.ChatFormatError(
            "invalid_record", f"field 'reward_models' is {reward_models!r}, expected an object")
    used_safety = record.get("used_safety")
    return Selection(
        messages=tuple(messages),
        is_safety_prompt=is_safety,
        score=score,
        helpfulness_score=_optional_number(record, "helpfulness_score", float),
        safety_score=_optional_number(record, "safety_score", float),
        used_safety=None if used_safety is None else bool(used_safety),
        iteration=_optional_number(record, "iteration", int),
        reward_models=reward_models,
        sample_index=_optional_number(record, "sample_index", int),
        num_samples=_optional_number(record, "num_samples", int),
    )


def read_selections_jsonl(path: str | os.PathLike, *, require_score: bool = True
                          ) -> list[Selection]:
    """Reads a selected set written by `write_selections_jsonl`.

    Raises:
      FileNotFoundError: the file does not exist.
      InvalidRecordError: a line is not a valid selection; the message names file and line.
    """
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"Selected-set file {path} does not exist.")
    return [selection for _, selection in read_jsonl_records(
        path, lambda record: selection_from_json(record, require_score=require_score))]


def write_selections_jsonl(path: str | os.PathLike, selections: Iterable[Selection]) -> int:
    """Writes selections as JSONL through a temporary file; returns how many were written."""
    lines = [json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in selections]
    write_text_atomic(path, "".join(lines))
    return len(lines)


def pool_selections(*groups: Sequence[Selection]) -> list[Selection]:
    """Keeps the best selection per prompt over all groups, groups ordered oldest first.

    The best is the highest score, and a tie goes to the later group, so a tie keeps the most
    recent answer. The result lists the prompts of the last group first, in its order, then
    those only in earlier groups, newest group first.

    Raises:
      ValueError: a score is not finite (a selection read without a score was not rescored).
    """
    best: dict[str, Selection] = {}
    for group in groups:
        for selection in group:
            if not math.isfinite(selection.score):
                raise ValueError(f"Cannot pool the answer to prompt {selection.key} with score "
                                 f"{selection.score}; rescore it first.")
            kept = best.get(selection.key)
            if kept is None or selection.score >= kept.score:
                best[selection.key] = selection
    order: dict[str, None] = {}
    for group in reversed(groups):
        for selection in group:
            order.setdefault(selection.key)
    return [best[key] for key in order]


# ---------------------------------------------------------------------------------------------
# Best-of-N curves.


def best_of_n_curves(scores: np.ndarray) -> dict[str, list[float]]:
    """Returns the expected max and median score among N of K samples, N = 1..K, averaged
    over prompts (`losses.expected_max_over_n` and `losses.expected_median_over_n`).

    Args:
      scores: [P, K] the K sample scores of each of P prompts.
    """
    scores = np.asarray(scores, np.float64)
    return {
        "n": list(range(1, scores.shape[1] + 1)),
        "max": losses.expected_max_over_n(scores).tolist(),
        "median": losses.expected_median_over_n(scores).tolist(),
    }


def plot_best_of_n(curves: Mapping[str, Any], path: str | os.PathLike, title: str) -> None:
    """Plots the max and median curves and the gap between them (Llama 2's Figure 7)."""
    n = curves["n"]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(n, curves["max"], marker="o", markersize=3, label="max over N")
    axis.plot(n, curves["median"], marker="o", markersize=3, label="median over N")
    axis.fill_between(n, curves["median"], curves["max"], alpha=0.15,
                      label="gain of selecting the best")
    axis.set_xlabel("N samples")
    axis.set_ylabel("reward score")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex}{path.suffix}")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Sampling phase.


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the config field that has an invalid value."""
    sampling = config.sampling
    if sampling.num_samples < 1:
        raise ValueError(f"sampling.num_samples must be >= 1, got {sampling.num_samples}.")
    if not sampling.temperature > 0:
        raise ValueError(
            f"sampling.temperature must be > 0 (K samples at temperature 0 are identical), got "
            f"{sampling.temperature}."
        )
    for name in ("max_prompt_length", "max_new_tokens", "prompt_batch_size",
                 "score_batch_size"):
        if sampling[name] < 1:
            raise ValueError(f"sampling.{name} must be positive, got {sampling[name]}.")
    if not 0 < config.selection.safety_threshold < 1:
        raise ValueError(f"selection.safety_threshold must be in (0, 1), got "
                         f"{config.selection.safety_threshold}.")
    if config.iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {config.iteration}.")


def sampling_manifest(config: ml_collections.ConfigDict, prompt_set: PromptSet,
                      sampling_policy: str, reward_models: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the settings that decide the content of the batch files."""
    sampling = config.sampling
    return {
        "seed": int(config.seed),
        "iteration": int(config.iteration),
        "prompts": {"count": len(prompt_set), "sha256": prompt_set.fingerprint()},
        "sampling_policy": model_identity(sampling_policy),
        "reward_models": {name: model_identity(reward_models.get(name) or None)
                          for name in ("helpfulness", "safety")},
        "sampling": {name: sampling[name] for name in (
            "num_samples", "temperature", "top_k", "top_p", "max_prompt_length",
            "max_new_tokens", "prompt_batch_size", "save_all_responses")},
        "selection": {"safety_threshold": float(config.selection.safety_threshold),
                      "skip_unfinished": bool(config.selection.skip_unfinished)},
    }


def _check_manifest(samples_dir: pathlib.Path, manifest: Mapping[str, Any]) -> None:
    """Writes the manifest, or checks that an existing one matches it."""
    path = samples_dir / MANIFEST_FILE
    expected = json.loads(json.dumps(manifest))
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != expected:
            changed = sorted(
                key for key in set(saved) | set(expected) if saved.get(key) != expected.get(key))
            raise ValueError(
                f"The samples in {samples_dir} were drawn with other settings (changed: "
                f"{', '.join(changed)}). Use a new workdir, or delete {samples_dir} to sample "
                "again."
            )
        return
    write_json_atomic(path, expected)


def batch_path(samples_dir: pathlib.Path, index: int) -> pathlib.Path:
    return samples_dir / f"batch_{index:06d}.json"


def _strip_stop(ids: list[int], stop_id: int) -> tuple[list[int], bool]:
    finished = bool(ids) and ids[-1] == stop_id
    return (ids[:-1] if finished else ids), finished


def make_sampler(policy: str | os.PathLike, config: ml_collections.ConfigDict,
                 tokenizer: Tokenizer, mesh) -> sampling_lib.Sampler:
    """Loads `policy` and returns a sampler drawing `config.sampling.num_samples` answers per
    prompt with the configured temperature, top-k, top-p and max_new_tokens."""
    model = load_initial_params(str(policy), head="lm", rng=jax.random.key(int(config.seed)),
                                mesh=mesh)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"The policy {policy} has {model.config.vocab_size} token ids, fewer than the "
            f"tokenizer {tokenizer.source} ({tokenizer.vocab_size}).")
    sampling = config.sampling
    sampling_config = sampling_lib.SamplingConfig(
        temperature=float(sampling.temperature), top_k=int(sampling.top_k) or None,
        top_p=float(sampling.top_p), max_new_tokens=int(sampling.max_new_tokens),
        num_samples=int(sampling.num_samples))
    return sampling_lib.Sampler(model.config, model.params, sampling_config, tokenizer.eos_id,
                                pad_id=tokenizer.pad_id, mesh=mesh)


def generate_padded(sampler: sampling_lib.Sampler, prompts: Sequence[Sequence[int]],
                    rng: jax.Array, pad_to: int, pad_id: int) -> list[list[int]]:
    """Generates `num_samples` responses per prompt, prompt-major, each with its stop token.

    The batch is padded to `pad_to` prompts (repeating the first) so that every call has one
    batch size and reuses one compiled program. The padding rows are dropped.
    """
    padded = list(prompts) + [prompts[0]] * (pad_to - len(prompts))
    batch = left_pad(padded, max(len(p) for p in padded), pad_id)
    output = sampler.generate(batch["tokens"], batch["mask"], rng)
    tokens = np.asarray(output.tokens)
    lengths = np.asarray(output.lengths)
    rows = len(prompts) * sampler.sampling.num_samples
    return [tokens[row, :lengths[row]].tolist() for row in range(rows)]


def sample_batch(
    sampler: sampling_lib.Sampler,
    scorer: RewardScorer,
    tokenizer: Tokenizer,
    prompt_set: PromptSet,
    indices: Sequence[int],
    rng: jax.Array,
    *,
    pad_to: int,
    skip_unfinished: bool,
    save_all_responses: bool,
) -> list[dict[str, Any]]:
    """Samples and scores K responses for the prompts `indices` of `prompt_set`.

    Args:
      pad_to: the number of prompts every sampler call is padded to (`generate_padded`).
      skip_unfinished: whether samples without EOS are excluded from the selection.
      save_all_responses: whether the result keeps the text of all K samples.

    Returns:
      One JSON-ready dict per prompt: index, key, scores, helpfulness, safety (None without a
      safety model), used_safety, lengths, finished (all K long), best (the selected sample or
      None), best_response (its text or None), and responses (all K texts) when
      `save_all_responses`.
    """
    num_samples = sampler.sampling.num_samples
    prompts = [prompt_set.ids[i] for i in indices]
    responses = generate_padded(sampler, prompts, rng, pad_to, tokenizer.pad_id)
    lengths = np.array([len(response) for response in responses])

    rows = len(responses)
    prompt_ids, response_ids, texts, finished = [], [], [], []
    for row, generated in enumerate(responses):
        answer_ids, is_finished = _strip_stop(generated, tokenizer.eos_id)
        prompt_ids.append(prompts[row // num_samples])
        # The reward models score the response as generated, EOS included when it was produced.
        response_ids.append(generated)
        texts.append(tokenizer.decode(answer_ids).strip())
        finished.append(is_finished)
    is_safety = [prompt_set.prompts[indices[row // num_samples]].is_safety_prompt
                 for row in range(rows)]
    scored = scorer.score(prompt_ids, response_ids, is_safety)

    # [P, K] views of the per-row results.
    scores = scored["score"].reshape(len(prompts), num_samples)
    eligible = np.array([bool(text) for text in texts]).reshape(scores.shape)
    if skip_unfinished:
        eligible &= np.asarray(finished).reshape(scores.shape)
    best = select_best(scores, eligible)

    results = []
    for position, index in enumerate(indices):
        rows_of_prompt = slice(position * num_samples, (position + 1) * num_samples)
        choice = int(best[position])
        result = {
            "index": int(index),
            "key": prompt_set.keys[index],
            "scores": scores[position].tolist(),
            "helpfulness": scored["helpfulness"][rows_of_prompt].tolist(),
            "safety": (None if scorer.safety is None
                       else scored["safety"][rows_of_prompt].tolist()),
            "used_safety": scored["used_safety"][rows_of_prompt].tolist(),
            "lengths": lengths[rows_of_prompt].tolist(),
            "finished": finished[rows_of_prompt],
            "best": None if choice < 0 else choice,
            "best_response": None if choice < 0 else texts[position * num_samples + choice],
        }
        if save_all_responses:
            result["responses"] = texts[rows_of_prompt]
        results.append(result)
    return results


def load_batch(samples_dir: pathlib.Path, index: int) -> list[dict[str, Any]] | None:
    """Returns the results of batch `index`, or None when it has not been written."""
    path = batch_path(samples_dir, index)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error}); delete the file to sample the batch "
                         "again.") from error
    if record.get("batch") != index or not isinstance(record.get("prompts"), list):
        raise ValueError(f"{path} is not the file of batch {index}; delete it to sample the "
                         "batch again.")
    return record["prompts"]


def run_sampling(
    config: ml_collections.ConfigDict,
    samples_dir: pathlib.Path,
    prompt_set: PromptSet,
    tokenizer: Tokenizer,
    make_sampler: Callable[[], sampling_lib.Sampler],
    make_scorer: Callable[[], RewardScorer],
    *,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Samples and scores every prompt batch that has no file yet; returns all prompt results.

    The sampler and scorer are created only when a batch is missing, so a finished phase loads
    no model.

    Args:
      on_batch: called with the batch index after each batch file is written (a test hook;
        raising in it interrupts the run as a kill would).
    """
    batch_size = int(config.sampling.prompt_batch_size)
    num_batches = -(-len(prompt_set) // batch_size)
    results: list[list[dict[str, Any]] | None] = [
        load_batch(samples_dir, index) for index in range(num_batches)]
    missing = [index for index, batch in enumerate(results) if batch is None]
    if num_batches - len(missing):
        logger.info("Found %d of %d sampled batches in %s.", num_batches - len(missing),
                    num_batches, samples_dir)
    if missing:
        sampler, scorer = make_sampler(), make_scorer()
        base_rng = jax.random.fold_in(jax.random.key(int(config.seed)), int(config.iteration))
        progress = tqdm.tqdm(missing, desc="rejection sampling", unit=" batches", disable=None)
        for index in progress:
            start = time.perf_counter()
            indices = list(range(index * batch_size,
                                 min((index + 1) * batch_size, len(prompt_set))))
            batch = sample_batch(
                sampler, scorer, tokenizer, prompt_set, indices,
                jax.random.fold_in(base_rng, index), pad_to=batch_size,
                skip_unfinished=bool(config.selection.skip_unfinished),
                save_all_responses=bool(config.sampling.save_all_responses),
            )
            write_json_atomic(batch_path(samples_dir, index), {"batch": index, "prompts": batch})
            results[index] = batch
            best = [max(result["scores"]) for result in batch]
            logger.info("batch %d/%d | %d prompts | mean best score %.4f | %.1fs", index + 1,
                        num_batches, len(batch), float(np.mean(best)),
                        time.perf_counter() - start)
            if on_batch is not None:
                on_batch(index)
    return [result for batch in results for result in batch]


# ---------------------------------------------------------------------------------------------
# Selection phase.


def selections_from_results(results: Sequence[Mapping[str, Any]], prompt_set: PromptSet, *,
                            iteration: int, reward_models: Mapping[str, str | None]
                            ) -> list[Selection]:
    """Builds the selected answer of each prompt that has one."""
    selections = []
    for result in results:
        choice = result["best"]
        if choice is None:
            continue
        prompt = prompt_set.prompts[result["index"]]
        safety = result["safety"]
        selections.append(Selection(
            messages=(*prompt.dialog, chat.Message("assistant", result["best_response"])),
            is_safety_prompt=prompt.is_safety_prompt,
            score=float(result["scores"][choice]),
            helpfulness_score=float(result["helpfulness"][choice]),
            safety_score=None if safety is None else float(safety[choice]),
            used_safety=bool(result["used_safety"][choice]),
            iteration=iteration,
            reward_models=dict(reward_models),
            sample_index=int(choice),
            num_samples=len(result["scores"]),
        ))
    return selections


def encode_selection(tokenizer: Tokenizer, selection: Selection
                     ) -> tuple[list[int], list[int]]:
    """Returns (prompt ids, answer ids) of a selection in the chat format: the ids of
    `encode_for_training` split where the selected answer's exchange opens its answer.

    The answer ids are those the policy would generate: the answer's pieces, the trailing
    space and EOS.
    """
    full_ids, _ = chat.encode_for_training(tokenizer, selection.messages, learn="last")
    prompt_ids = chat.encode_prompt(tokenizer, selection.prompt)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(
            f"The tokenizer {tokenizer.source} encodes the prompt of {selection.key} differently "
            "inside the dialogue than alone, so its answer cannot be rescored."
        )
    return prompt_ids, full_ids[len(prompt_ids):]


def rescore(selections: Sequence[Selection], scorer: RewardScorer, tokenizer: Tokenizer
            ) -> list[Selection]:
    """Scores each selection's answer again, from its text, with `scorer`'s reward models."""
    if not selections:
        return []
    encoded = [encode_selection(tokenizer, selection) for selection in selections]
    scored = scorer.score([prompt for prompt, _ in encoded], [answer for _, answer in encoded],
                          [selection.is_safety_prompt for selection in selections])
    rescored = []
    for row, selection in enumerate(selections):
        safety = float(scored["safety"][row])
        rescored.append(dataclasses.replace(
            selection,
            score=float(scored["score"][row]),
            helpfulness_score=float(scored["helpfulness"][row]),
            safety_score=None if math.isnan(safety) else safety,
            used_safety=bool(scored["used_safety"][row]),
            reward_models=dict(scorer.sources),
        ))
    return rescored


def build_selected_set(
    current: Sequence[Selection],
    previous_selections: Sequence[str | os.PathLike],
    *,
    pool: bool,
    rescore_previous: bool,
    make_scorer: Callable[[], RewardScorer],
    tokenizer: Tokenizer,
) -> tuple[list[Selection], dict[str, Any]]:
    """Returns the selected set, pooled with earlier selections when `pool`, and its counts.

    With `rescore_previous`, every pooled answer (this run's included) is scored again from
    its text with this run's reward models before the comparison, so all scores come from one
    reward-model version. Otherwise stored scores are compared as they are.
    """
    counts: dict[str, Any] = {"current": len(current)}
    if not pool or not previous_selections:
        if previous_selections:
            logger.warning("selection.pool_previous is off; ignoring %d earlier selected sets.",
                           len(previous_selections))
        return list(current), counts
    groups = []
    for path in previous_selections:
        group = read_selections_jsonl(path, require_score=not rescore_previous)
        logger.info("Read %d earlier selections from %s.", len(group), path)
        groups.append(group)
    counts["previous"] = {str(path): len(group)
                          for path, group in zip(previous_selections, groups, strict=True)}
    if rescore_previous:
        scorer = make_scorer()
        groups = [rescore(group, scorer, tokenizer) for group in groups]
        current = rescore(current, scorer, tokenizer)
    pooled = pool_selections(*groups, current)
    current_keys = {selection.key: selection for selection in current}
    counts["pooled"] = len(pooled)
    counts["kept_from_current"] = sum(
        1 for selection in pooled if current_keys.get(selection.key) is selection)
    counts["kept_from_previous"] = counts["pooled"] - counts["kept_from_current"]
    return pooled, counts


# ---------------------------------------------------------------------------------------------
# The stage.


def sample_statistics(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over all samples of the score, response length, finished fraction and safety
    gate, the mean best score, and the number of prompts without an eligible sample."""
    scores = np.array([result["scores"] for result in results], np.float64)
    lengths = np.array([result["lengths"] for result in results], np.float64)
    finished = np.array([result["finished"] for result in results], bool)
    statistics = {
        "num_prompts": len(results),
        "num_samples": int(scores.shape[1]),
        "score_mean": float(scores.mean()),
        "score_best_mean": float(scores.max(axis=1).mean()),
        "response_length_mean": float(lengths.mean()),
        "finished_fraction": float(finished.mean()),
        "prompts_without_eligible_sample": sum(result["best"] is None for result in results),
    }
    used = np.array([result["used_safety"] for result in results], bool)
    statistics["safety_gate_fraction"] = float(used.mean())
    return statistics


def write_curves(workdir: pathlib.Path, results: Sequence[Mapping[str, Any]],
                 prompt_set: PromptSet, config: ml_collections.ConfigDict,
                 reward_description: str) -> dict[str, Any]:
    """Writes best_of_n.json and best_of_n.png; returns the curves."""
    scores = np.array([result["scores"] for result in results], np.float64)
    is_safety = np.array([prompt_set.prompts[r["index"]].is_safety_prompt for r in results])
    curves: dict[str, Any] = {
        **best_of_n_curves(scores),
        "num_prompts": int(scores.shape[0]),
        "temperature": float(config.sampling.temperature),
        "reward": reward_description,
        "by_prompt_type": {},
    }
    for name, rows in (("helpfulness_prompts", ~is_safety), ("safety_prompts", is_safety)):
        if rows.any():
            curves["by_prompt_type"][name] = {**best_of_n_curves(scores[rows]),
                                              "num_prompts": int(rows.sum())}
    write_json_atomic(workdir / CURVES_FILE, curves)
    plot_best_of_n(curves, workdir / PLOT_FILE,
                   f"Best of N, {scores.shape[0]} prompts, T = {config.sampling.temperature:g}")
    return curves


def finetune_on_selections(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                           selections: Sequence[Selection], *, policy_init: str,
                           tokenizer: Tokenizer, metadata: Mapping[str, Any],
                           on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fine-tunes `policy_init` on the selected answers with the SFT stage under
    `workdir/finetune` and moves its exported model to `workdir/model`.

    Only the selected answer's tokens are targets (`encode_for_training(..., learn="last")`),
    so earlier answers of a multi-turn prompt stay context.

    Returns:
      {"metrics": the SFT stage's last train metrics, "steps", "model_dir": `workdir/model`}.
    """
    if not selections:
        raise ValueError("The selected set is empty: no prompt has an eligible sample. Raise "
                         "sampling.max_new_tokens or turn off selection.skip_unfinished.")
    examples = [chat.encode_for_training(tokenizer, s.messages, learn="last") for s in selections]
    result = sft.train_on_examples(config.finetune, workdir / FINETUNE_DIR, examples,
                                   init_from=policy_init, tokenizer=tokenizer,
                                   metadata=dict(metadata), on_step=on_step)

    # A rename, not a second export: the SFT stage has just written a complete model folder.
    model_dir = (workdir / MODEL_DIR).absolute()
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(result.model_dir, model_dir)
    return {"metrics": dict(result.metrics), "steps": int(result.steps),
            "model_dir": str(model_dir)}


def _run_fingerprint(manifest: Mapping[str, Any], config: ml_collections.ConfigDict,
                     policy_init: str, previous_selections: Sequence[str]) -> str:
    """SHA-256 over everything that decides a run's outputs, for reusing a finished run."""
    description = {
        "manifest": manifest,
        "policy_init": model_identity(policy_init),
        "previous_selections": [
            {"path": str(path), "sha256": file_sha256(path)} for path in previous_selections],
        "pooling": {"pool_previous": bool(config.selection.pool_previous),
                    "rescore_previous": bool(config.selection.rescore_previous)},
        "finetune": json.loads(config.finetune.to_json_best_effort(sort_keys=True)),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def create_mesh(config: ml_collections.ConfigDict):
    """Creates the sampling mesh `config.mesh` over the first `config.num_devices` devices
    (0: all)."""
    devices = jax.devices()
    if config.num_devices:
        if config.num_devices > len(devices):
            raise ValueError(f"config.num_devices is {config.num_devices}, but only "
                             f"{len(devices)} devices are available.")
        devices = devices[: config.num_devices]
    return shd.create_mesh(dict(config.mesh), devices)


def run_rejection_sampling(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    policy_init: str | os.PathLike,
    reward_models: Mapping[str, str | os.PathLike | None],
    prompts: Sequence[Any],
    tokenizer: Tokenizer,
    previous_selections: Sequence[str | os.PathLike] = (),
    sampling_policy: str | os.PathLike | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Runs one iteration of rejection-sampling fine-tuning (see the module docstring).

    Rerunning with the same arguments and workdir resumes an interrupted run; a finished run
    returns its summary.

    Args:
      config: a `configs/rejection_sampling.py` config.
      workdir: the run's folder.
      policy_init: the policy to fine-tune (anything `load_initial_params` accepts).
      reward_models: {"helpfulness": directory, "safety": directory or None} of reward models
        exported with head "scalar".
      prompts: `ppo.Prompt`s (or synthetic `WorldPrompt`s) given as messages ending with a
        user message.
      tokenizer: the policy's tokenizer, shared by the reward models.
      previous_selections: `selected.jsonl` files of earlier iterations, oldest first, pooled
        when `config.selection.pool_previous`.
      sampling_policy: the model that samples; default `policy_init`.
      on_batch, on_step: test hooks called after each sampled batch and each fine-tuning step.

    Returns:
      A dict with the sampling statistics, the best-of-N curves, the selection counts, the
      fine-tuning metrics and the paths of selected.jsonl, best_of_n.json, best_of_n.png and
      the exported model (also written to `workdir/summary.json`).
    """
    start = time.perf_counter()
    _check_config(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    policy_init = str(policy_init)
    sampling_policy = str(sampling_policy or policy_init)
    previous_selections = [str(path) for path in previous_selections]
    for path in previous_selections:
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"Earlier selected set {path} does not exist.")
    sources = {name: None if not reward_models.get(name) else str(reward_models[name])
               for name in ("helpfulness", "safety")}

    prompt_set = prepare_prompts(prompts, tokenizer, int(config.sampling.max_prompt_length),
                                 int(config.max_prompts))
    manifest = sampling_manifest(config, prompt_set, sampling_policy, reward_models)
    fingerprint = _run_fingerprint(json.loads(json.dumps(manifest)), config, policy_init,
                                   previous_selections)
    summary_path = workdir / SUMMARY_FILE
    if summary_path.is_file() and (workdir / MODEL_DIR).is_dir():
        summary = json.loads(summary_path.read_text())
        if summary.get("fingerprint") == fingerprint:
            logger.info("Rejection sampling in %s has already finished; returning its summary.",
                        workdir)
            return summary
    samples_dir = workdir / SAMPLES_DIR
    samples_dir.mkdir(parents=True, exist_ok=True)
    _check_manifest(samples_dir, manifest)
    # Written after the manifest check, so that rejected settings never replace the config.
    save_config(workdir, config)
    mesh = create_mesh(config)

    # Models are loaded on first use and released before fine-tuning.
    loaded: dict[str, Any] = {}

    def make_scorer() -> RewardScorer:
        if "scorer" not in loaded:
            loaded["scorer"] = load_reward_scorer(reward_models, tokenizer, config, mesh)
        return loaded["scorer"]

    def make_policy_sampler() -> sampling_lib.Sampler:
        return make_sampler(sampling_policy, config, tokenizer, mesh)

    # 1-2. Sample, score and select the best sample per prompt.
    results = run_sampling(config, samples_dir, prompt_set, tokenizer, make_policy_sampler,
                           make_scorer, on_batch=on_batch)
    statistics = sample_statistics(results)
    logger.info("Sampled %d prompts x %d: mean score %.4f, mean best score %.4f, %.1f%% "
                "finished with EOS.", statistics["num_prompts"], statistics["num_samples"],
                statistics["score_mean"], statistics["score_best_mean"],
                100 * statistics["finished_fraction"])
    reward_description = ("gated R_c of the helpfulness and safety models" if sources["safety"]
                          else "sigmoid of the helpfulness model's score")
    curves = write_curves(workdir, results, prompt_set, config, reward_description)
    logger.info("Best of N: max %s | median %s", _format_curve(curves["max"]),
                _format_curve(curves["median"]))

    # 3-4. Pool with earlier iterations and write the selected set.
    current = selections_from_results(results, prompt_set, iteration=int(config.iteration),
                                      reward_models=sources)
    selected, counts = build_selected_set(
        current, previous_selections, pool=bool(config.selection.pool_previous),
        rescore_previous=bool(config.selection.rescore_previous), make_scorer=make_scorer,
        tokenizer=tokenizer)
    write_selections_jsonl(workdir / SELECTED_FILE, selected)
    logger.info("Wrote %d selected answers to %s (%s).", len(selected),
                workdir / SELECTED_FILE, counts)
    loaded.clear()

    # 5. Fine-tune on the selected set.
    finetune = finetune_on_selections(
        config, workdir, selected, policy_init=policy_init, tokenizer=tokenizer,
        metadata={"stage": "rejection_sampling", "iteration": int(config.iteration),
                  "sampling_policy": sampling_policy, "reward_models": sources,
                  "num_selected": len(selected)},
        on_step=on_step)

    summary = {
        "iteration": int(config.iteration),
        "fingerprint": fingerprint,
        "prompts": {"used": len(prompt_set), "dropped_too_long": prompt_set.num_too_long,
                    "dropped_duplicates": prompt_set.num_duplicates},
        "sampling": statistics,
        "best_of_n": {name: curves[name] for name in ("n", "max", "median")},
        "selection": {**counts, "selected": len(selected),
                      "score_mean": float(np.mean([s.score for s in selected]))},
        "finetune": finetune,
        "selected_file": str(workdir / SELECTED_FILE),
        "curves_file": str(workdir / CURVES_FILE),
        "plot_file": str(workdir / PLOT_FILE),
        "model_dir": finetune["model_dir"],
        "seconds": time.perf_counter() - start,
    }
    write_json_atomic(summary_path, summary)
    return summary


def _format_curve(values: Sequence[float]) -> str:
    return " ".join(f"{value:.3f}" for value in values)


# ---------------------------------------------------------------------------------------------
# Entry point.


def sample_answers(policy: str | os.PathLike, prompts: Sequence[Prompt], tokenizer: Tokenizer,
                   config: ml_collections.ConfigDict, rng: jax.Array
                   ) -> tuple[list[Prompt], list[str]]:
    """Samples K answers per prompt from `policy`, as the sampling phase does.

    Returns:
      (prompts, answers): each prompt repeated K times and the K answers, without EOS.
    """
    sampler = make_sampler(policy, config, tokenizer, create_mesh(config))
    batch_size = int(config.sampling.prompt_batch_size)
    repeated, answers = [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        responses = generate_padded(sampler, [p.encode(tokenizer) for p in batch],
                                    jax.random.fold_in(rng, start), batch_size,
                                    tokenizer.pad_id)
        repeated += [p for p in batch for _ in range(sampler.sampling.num_samples)]
        answers += [tokenizer.decode(_strip_stop(ids, tokenizer.eos_id)[0]).strip()
                    for ids in responses]
    return repeated, answers


def evaluate_with_gold_scorer(setup, workdir: pathlib.Path, summary: Mapping[str, Any],
                              config: ml_collections.ConfigDict, policy_init: str
                              ) -> dict[str, Any]:
    """Measures true answer quality with the synthetic world's gold scorer.

    Reports the mean gold score of all sampled answers (what one sample scores on average),
    of the selected answers, and of K answers per held-out prompt sampled from the initial and
    from the fine-tuned policy with the same key. Writes `workdir/evaluation.json`, which a
    rerun of the same finished run reuses.
    """
    path = workdir / "evaluation.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == summary["fingerprint"]:
            return saved
    evaluation: dict[str, Any] = {"fingerprint": summary["fingerprint"]}

    # The training prompts: every sample against the selected ones.
    prompt_set = prepare_prompts(setup.train_prompts, setup.tokenizer,
                                 int(config.sampling.max_prompt_length), int(config.max_prompts))
    batch_size = int(config.sampling.prompt_batch_size)
    results = [result for index in range(-(-len(prompt_set) // batch_size))
               for result in load_batch(workdir / SAMPLES_DIR, index)]
    if all("responses" in result for result in results):
        prompts = [prompt_set.prompts[r["index"]] for r in results for _ in r["responses"]]
        answers = [answer for r in results for answer in r["responses"]]
        evaluation["all_samples"] = setup.gold_metrics(prompts, answers)
    selected = read_selections_jsonl(workdir / SELECTED_FILE)
    evaluation["selected"] = setup.gold_metrics(
        [Prompt(s.prompt, s.is_safety_prompt) for s in selected], [s.answer for s in selected])

    # Held-out prompts: the policy before and after fine-tuning.
    if setup.eval_prompts:
        rng = jax.random.key(int(config.seed) + 1)
        for name, policy in (("initial_policy", policy_init),
                             ("fine_tuned_policy", summary["model_dir"])):
            prompts, answers = sample_answers(policy, setup.eval_prompts, setup.tokenizer,
                                              config, rng)
            evaluation[name] = setup.gold_metrics(prompts, answers)
    write_json_atomic(path, evaluation)
    return evaluation


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict[str, Any]:
    """Runs rejection sampling as configured by `configs/rejection_sampling.py`.

    With `config.synthetic.enabled` (the tiny variant) the tokenizer, policy, reward models and
    prompts come from the synthetic setup under `workdir/setup`. Otherwise they come from the
    paths in the config. See `run_rejection_sampling` for the result.
    """
    workdir = pathlib.Path(workdir).absolute()
    previous = [path.strip() for path in config.previous_selections.split(",") if path.strip()]
    if config.synthetic.enabled:
        from llama_rlhf import synthetic  # noqa: PLC0415 (builds models; only the tiny run)

        setup = synthetic.build_synthetic_setup(config.synthetic, workdir / "setup",
                                                seed=int(config.seed))
        summary = run_rejection_sampling(
            config, workdir, policy_init=str(setup.policy_dir),
            reward_models={"helpfulness": str(setup.helpfulness_dir),
                           "safety": str(setup.safety_dir)},
            prompts=setup.train_prompts, tokenizer=setup.tokenizer, previous_selections=previous,
            sampling_policy=config.sampling_policy or None)
        evaluation = evaluate_with_gold_scorer(setup, workdir, summary, config,
                                               str(setup.policy_dir))
        for name, metrics in evaluation.items():
            if name != "fingerprint":
                logger.info("Gold scores of %s: %s", name.replace("_", " "), metrics)
        return {**summary, "gold": evaluation}
    for field in ("policy_init", "tokenizer", "reward_models.helpfulness", "prompts"):
        value = config
        for part in field.split("."):
            value = value[part]
        if not value:
            raise ValueError(f"config.{field} is empty; the {config.variant} variant needs it.")
    return run_rejection_sampling(
        config, workdir, policy_init=config.policy_init,
        reward_models={"helpfulness": config.reward_models.helpfulness,
                       "safety": config.reward_models.safety or None},
        prompts=read_prompts_jsonl(config.prompts), tokenizer=load_tokenizer(config.tokenizer),
        previous_selections=previous, sampling_policy=config.sampling_policy or None)
