"""Supervised fine-tuning (SFT) on chat dialogues, with the loss on assistant tokens only.

Llama 2-Chat's SFT stage (Touvron et al. 2023, section 3.1) fine-tunes the pretrained model on
dialogues in the chat format with a cosine schedule, peak learning rate 2e-5, weight decay 0.1,
batch size 64 and sequence length 4096 for 2 epochs, and zeroes the loss on prompt tokens, so
only answer tokens are learned.

Data format: JSONL (optionally gzip-compressed, ".jsonl.gz"), one dialogue per line:

    {"messages": [{"role": "system", "content": "..."},      # optional, first only
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."},
                  ...]}

Roles alternate user/assistant after the optional system message and the last message is an
assistant's. Every assistant turn is a target; `llama_rlhf.data.chat.encode_for_training`
builds the token ids and the loss mask in Meta's chat format.

Entry points: `train_and_evaluate(config, workdir)` reads the files named in the config;
`train_on_examples(config, workdir, examples, ...)` trains on prepared (ids, loss_mask) pairs,
which is how rejection sampling and Ghost Attention reuse this stage.

NOTE: each dialogue fills its own row, right-padded to `max_length`; Llama 2 instead
concatenated all dialogues into full sequences. Padding costs compute (visible as lower MFU),
not correctness.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from llama_rlhf import losses
from llama_rlhf import sharding as shd
from llama_rlhf.data.batching import pack_sft
from llama_rlhf.data.chat import ChatFormatError, Message, encode_for_training, validate_dialog
from llama_rlhf.data.hh_rlhf import read_hh_rlhf_jsonl
from llama_rlhf.data.preferences import ReadSummary, read_jsonl_records
from llama_rlhf.data.tokenizer import Tokenizer, load_tokenizer
from llama_rlhf.model import Llama, LlamaConfig
from llama_rlhf.training import (
    DataOrder,
    create_train_state,
    evaluate,
    initial_model_config,
    load_initial_params,
    make_eval_step,
    make_optimizer,
    make_train_step,
    save_config,
    save_model,
    train_loop,
    train_state_shardings,
)

MODEL_DIR = "model"

Example = tuple[Sequence[int], Sequence[int]]


# ---------------------------------------------------------------------------------------------
# Data.


def dialogue_from_json(record: Any) -> list[Message]:
    """Converts one decoded JSONL record {"messages": [...]} to a validated dialogue.

    Raises:
      ChatFormatError: the record is not an object with a "messages" list of
        {"role", "content"} objects forming a dialogue that ends with an assistant message.
    """
    if not isinstance(record, dict) or "messages" not in record:
        raise ChatFormatError(
            "invalid_record",
            f"expected an object with a 'messages' list, got {type(record).__name__}"
            + (f" with keys {sorted(record)}" if isinstance(record, dict) else ""),
        )
    raw_messages = record["messages"]
    if not isinstance(raw_messages, list):
        raise ChatFormatError(
            "invalid_record", f"'messages' is a {type(raw_messages).__name__}, expected a list"
        )
    messages = []
    for index, raw in enumerate(raw_messages):
        if not isinstance(raw, dict) or set(raw) != {"role", "content"}:
            raise ChatFormatError(
                "invalid_message",
                f"message {index} is {raw!r}, expected an object with exactly the keys "
                "'role' and 'content'",
            )
        messages.append(Message(role=raw["role"], content=raw["content"]))
    validate_dialog(messages, last_role="assistant")
    return messages


def dialogue_to_json(messages: Sequence[Message]) -> dict[str, Any]:
    """Returns the JSONL record of a dialogue (the inverse of `dialogue_from_json`)."""
    return {"messages": [{"role": m.role, "content": m.content} for m in messages]}


def read_dialogues_jsonl(
    path: str | os.PathLike, *, skip_invalid: bool = False
) -> list[list[Message]]:
    """Reads the dialogues of a JSONL file (format in the module docstring).

    Raises:
      InvalidRecordError: a line is not a valid dialogue; the message names file and line.
        With `skip_invalid`, such lines are skipped and counted in a warning instead.
    """
    return [dialogue for _, dialogue in
            read_jsonl_records(path, dialogue_from_json, skip_invalid=skip_invalid)]


def write_dialogues_jsonl(path: str | os.PathLike, dialogues: Iterable[Sequence[Message]]) -> int:
    """Writes dialogues as JSONL through a temporary file; returns how many were written."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    count = 0
    with tmp.open("w", encoding="utf-8") as file:
        for dialogue in dialogues:
            validate_dialog(list(dialogue), last_role="assistant")
            file.write(json.dumps(dialogue_to_json(dialogue), ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def load_sft_examples(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    *,
    skip_invalid: bool = False,
) -> list[tuple[list[int], list[int]]]:
    """Reads dialogue files and encodes each dialogue as (ids, loss_mask).

    Reading and encoding happen line by line, so an error (bad JSON, a broken dialogue, text
    the chat format cannot encode) names the file and line.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]

    def parse(record: Any) -> tuple[list[int], list[int]]:
        return encode_for_training(tokenizer, dialogue_from_json(record))

    examples = []
    for path in paths:
        summary = ReadSummary()
        records = read_jsonl_records(path, parse, skip_invalid=skip_invalid, summary=summary)
        for _, example in tqdm.tqdm(records, desc=f"encoding {pathlib.Path(path).name}",
                                    unit=" dialogues", disable=None, leave=False):
            examples.append(example)
        logging.info("%s", summary)
    return examples


def _check_examples(examples: Sequence[Example], vocab_size: int, name: str) -> None:
    if not examples:
        raise ValueError(f"No {name} examples: the SFT data is empty.")
    for index, (ids, loss_mask) in enumerate(examples):
        if len(ids) != len(loss_mask):
            raise ValueError(
                f"{name} example {index} has {len(ids)} ids but a loss mask of length "
                f"{len(loss_mask)}; expected equal lengths."
            )
        ids = np.asarray(ids, np.int64)
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise ValueError(
                f"{name} example {index} has token id {bad[0]} "
                f"outside the model's vocabulary [0, {vocab_size}); the tokenizer and the model "
                "do not match."
            )


def keep_trainable(
    examples: Sequence[Example], max_length: int, truncate: bool, name: str
) -> list[Example]:
    """Drops examples that have no target token within their first `max_length` tokens.

    Such examples only add padding: truncation cut off all of their answers (or they had
    none). Their number is logged.

    Raises:
      ValueError: an example is longer than `max_length` and `truncate` is off, or no example
        is left.
    """
    kept = []
    for index, (ids, loss_mask) in enumerate(examples):
        if len(ids) > max_length and not truncate:
            raise ValueError(
                f"{name} example {index} has {len(ids)} tokens, more than max_length "
                f"{max_length}; raise max_length or turn on truncation."
            )
        # loss_mask[0] is never a target: nothing predicts the first token.
        if np.any(np.asarray(loss_mask[1:max_length], bool)):
            kept.append((ids, loss_mask))
    if len(kept) < len(examples):
        logging.warning(
            "Dropped %d of %d %s examples without a target token in their first %d tokens.",
            len(examples) - len(kept), len(examples), name, max_length,
        )
    if not kept:
        raise ValueError(f"No {name} example has a target token within max_length {max_length}.")
    return kept


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """Returns a SHA-256 over all ids and masks, to refuse resuming on different data."""
    digest = hashlib.sha256()
    for ids, loss_mask in examples:
        digest.update(np.asarray(ids, np.int64).tobytes())
        digest.update(np.asarray(loss_mask, np.int8).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def eval_batches(
    examples: Sequence[Example], batch_size: int, max_length: int, pad_id: int, truncate: bool
) -> list[dict[str, np.ndarray]]:
    """Batches every eval example in order, with the same shape for every batch.

    The last batch is filled up with empty rows (all-False masks), which count for nothing.
    """
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        chunk += [([], [])] * (batch_size - len(chunk))
        batches.append(pack_sft(chunk, max_length, pad_id, truncate=truncate))
    return batches


# ---------------------------------------------------------------------------------------------
# Loss.


def make_loss_fn(model: Llama) -> Callable:
    """Returns loss_fn(params, batch, rng) -> (loss, metrics) for `make_train_step`.

    The loss is `losses.sft_loss`: the mean next-token cross-entropy over tokens whose
    loss_mask is 1 (assistant answers), weighted by their count across the batch.
    """

    def loss_fn(params, batch: Mapping[str, jax.Array], rng: jax.Array):
        del rng  # The model has no dropout.
        logits, _ = model.apply({"params": params}, batch["tokens"], mask=batch["mask"])
        loss, count = losses.sft_loss(logits, batch["tokens"], batch["loss_mask"])
        return loss, {"loss": (loss * count, count), "target_tokens": (count, 1.0)}

    return loss_fn


def make_eval_metrics_fn(model: Llama) -> Callable:
    """Returns metrics_fn(params, batch) -> {"loss", "accuracy"} as (sum, count) over targets."""

    def metrics_fn(params, batch):
        logits, _ = model.apply({"params": params}, batch["tokens"], mask=batch["mask"])
        loss, count = losses.sft_loss(logits, batch["tokens"], batch["loss_mask"])
        targets = batch["loss_mask"][:, 1:].astype(bool)
        # [B, T - 1]: whether the most likely next token is the target.
        correct = jnp.argmax(logits[:, :-1], axis=-1) == batch["tokens"][:, 1:]
        num_correct = jnp.sum(correct & targets, dtype=jnp.float32)
        return {"loss": (loss * count, count), "accuracy": (num_correct, count)}

    return metrics_fn


# ---------------------------------------------------------------------------------------------
# Training.


def create_mesh_from_config(config: ml_collections.ConfigDict):
    """Creates the mesh of `config.mesh` over the first `config.num_devices` devices
    (0: all devices)."""
    devices = jax.devices()
    if config.num_devices:
        if config.num_devices > len(devices):
            raise ValueError(
                f"config.num_devices is {config.num_devices}, but only {len(devices)} devices "
                "are available."
            )
        devices = devices[: config.num_devices]
    return shd.create_mesh(dict(config.mesh), devices)


@dataclasses.dataclass
class SFTResult:
    """The result of `train_on_examples`.

    Attributes:
      metrics: the last train metrics ("train/...") and eval metrics ("eval/loss",
        "eval/accuracy", "eval/perplexity") when evaluated.
      steps: the number of optimizer steps of the run.
      model_dir: the exported model (`save_model` format), the input of the next stage.
      model_config: the trained model's LlamaConfig.
      params: the final parameters.
    """

    metrics: dict[str, float]
    steps: int
    model_dir: pathlib.Path
    model_config: LlamaConfig
    params: Any


def train_on_examples(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    examples: Sequence[Example],
    *,
    init_from: str | None = None,
    tokenizer: Tokenizer | None = None,
    eval_examples: Sequence[Example] | None = None,
    metadata: Mapping[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> SFTResult:
    """Fine-tunes a language model on prepared (ids, loss_mask) examples.

    Rerunning with the same arguments and workdir resumes from the last checkpoint with the
    same data order. A run that already finished only exports its model again.

    Args:
      config: an SFT config (see configs/sft.py); `config.init_from` and
        `config.data.tokenizer` are used unless overridden here.
      workdir: the run's folder: config.json, checkpoints, metrics and the exported model
        (`workdir/model`).
      examples: (ids, loss_mask) pairs, for example from `encode_for_training`;
        loss_mask[t] = 1 marks ids[t] as a target. Per-turn masks (Ghost Attention) and
        selected samples (rejection sampling) come in this form.
      init_from: the starting model (see `load_initial_params`); default `config.init_from`.
      tokenizer: supplies the pad id; default: loaded from `config.data.tokenizer`.
      eval_examples: held-out pairs for the eval loss, perplexity and next-token accuracy.
      metadata: extra JSON stored with the exported model.
      on_step: test hook called with the completed step count after each step.

    Returns:
      An `SFTResult`.
    """
    workdir = pathlib.Path(workdir)
    init_from = init_from or config.init_from
    if tokenizer is None:
        tokenizer = load_tokenizer(config.data.tokenizer)
    save_config(workdir, config)

    mesh = create_mesh_from_config(config)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    overrides = dict(config.model_overrides)
    model_config = initial_model_config(init_from, model_config_overrides=overrides)
    max_length, truncate = int(config.data.max_length), bool(config.data.truncate)
    _check_examples(examples, model_config.vocab_size, "training")
    examples = keep_trainable(examples, max_length, truncate, "training")
    if eval_examples:
        _check_examples(eval_examples, model_config.vocab_size, "eval")
        eval_examples = keep_trainable(eval_examples, max_length, truncate, "eval")

    order = DataOrder(len(examples), int(config.batch_size), int(config.seed))
    num_steps = int(config.num_steps) or int(config.num_epochs) * order.steps_per_epoch
    tx, schedule = make_optimizer(config.optimizer, num_steps)
    abstract_state, state_shardings = train_state_shardings(model_config, "lm", tx, mesh)

    def init_state():
        # Called only without a checkpoint to resume, so a resume never loads these weights.
        loaded = load_initial_params(init_from, head="lm", rng=init_rng, mesh=mesh,
                                     model_config_overrides=overrides)
        state, _ = create_train_state(model_config, "lm", tx, mesh, init_rng,
                                      params=loaded.params)
        return state

    model = Llama(model_config, head="lm")
    train_step = make_train_step(make_loss_fn(model), mesh=mesh, state_shardings=state_shardings,
                                 batch_size=order.batch_size, schedule=schedule)

    def batch_fn(step: int) -> dict[str, np.ndarray]:
        chosen = [examples[i] for i in order.indices(step)]
        return pack_sft(chosen, max_length, tokenizer.pad_id,
                        truncate=truncate)

    eval_fn = None
    if eval_examples:
        batches = eval_batches(eval_examples, order.batch_size, max_length,
                               tokenizer.pad_id, truncate)
        eval_step = make_eval_step(make_eval_metrics_fn(model), mesh=mesh,
                                   param_shardings=state_shardings.params,
                                   batch_size=order.batch_size)

        def eval_fn(state):
            metrics = evaluate(eval_step, state.params, batches, mesh)
            metrics["perplexity"] = float(np.exp(metrics["loss"]))
            return metrics

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
        flops_per_token=model_config.flops_per_token(seq_len=max_length),
        data_order=order,
        checkpoint_metadata={"stage": "sft", "examples_sha256": examples_fingerprint(examples),
                             "init_from": str(init_from)},
        on_step=on_step,
    )

    model_dir = save_model(
        workdir / MODEL_DIR, model_config, result.state.params, head="lm",
        metadata={"stage": "sft", "init_from": str(init_from), "steps": result.step,
                  "tokenizer_path": str(config.data.tokenizer), **dict(metadata or {})},
    )
    logging.info("Saved the SFT model after %d steps to %s.", result.step, model_dir)
    metrics = {f"train/{k}": v for k, v in result.train_metrics.items()}
    metrics.update({f"eval/{k}": v for k, v in result.eval_metrics.items()})
    return SFTResult(metrics=metrics, steps=result.step, model_dir=model_dir,
                     model_config=model_config, params=result.state.params)


def _as_paths(value: str | Sequence[str]) -> list[str]:
    """Accepts a comma-separated string or a sequence of paths."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(part) for part in value]


def hh_rlhf_chosen_examples(
    path: str | os.PathLike, tokenizer: Tokenizer, *, subset: str, skip_invalid: bool
) -> list[tuple[list[int], list[int]]]:
    """Encodes the chosen transcript (context + chosen answer) of each HH-RLHF pair.

    Only the chosen answer is a target; earlier assistant turns of the context, written by
    the model that collected the data, are not.
    """
    comparisons = read_hh_rlhf_jsonl(path, subset=subset, skip_invalid=skip_invalid)
    examples, num_skipped = [], 0
    for index, comparison in enumerate(comparisons):
        dialogue = [*comparison.context, Message("assistant", comparison.chosen)]
        try:
            examples.append(encode_for_training(tokenizer, dialogue, learn="last"))
        except ChatFormatError as error:
            if not skip_invalid:
                raise ValueError(
                    f"{path}: comparison {index} cannot be encoded: {error}"
                ) from error
            num_skipped += 1
    if num_skipped:
        logging.warning("%s: skipped %d comparisons the chat format cannot encode.", path,
                        num_skipped)
    return examples


def load_data(
    data_config: ml_collections.ConfigDict, tokenizer: Tokenizer
) -> tuple[list[tuple[list[int], list[int]]], list[tuple[list[int], list[int]]]]:
    """Reads and encodes the training and eval examples named by `config.data`.

    Returns:
      (train_examples, eval_examples); eval_examples is empty without eval files and with
      eval_fraction 0.
    """
    skip_invalid = bool(data_config.skip_invalid)
    examples = []
    if data_config.hh_rlhf_path:
        examples += hh_rlhf_chosen_examples(data_config.hh_rlhf_path, tokenizer,
                                            subset=data_config.hh_rlhf_subset,
                                            skip_invalid=skip_invalid)
    train_files = _as_paths(data_config.train_files)
    if train_files:
        examples += load_sft_examples(train_files, tokenizer, skip_invalid=skip_invalid)
    if not examples:
        raise ValueError(
            "No SFT data: set config.data.train_files (dialogue JSONL) or config.data.hh_rlhf_path."
        )
    if data_config.limit:
        examples = examples[: int(data_config.limit)]

    eval_files = _as_paths(data_config.eval_files)
    if eval_files:
        return examples, load_sft_examples(eval_files, tokenizer, skip_invalid=skip_invalid)
    fraction = float(data_config.eval_fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"config.data.eval_fraction must be in [0, 1), got {fraction}.")
    num_eval = round(fraction * len(examples))
    if num_eval == 0:
        return examples, []
    order = np.random.default_rng(int(data_config.split_seed)).permutation(len(examples))
    eval_indices = set(order[:num_eval].tolist())
    train = [example for i, example in enumerate(examples) if i not in eval_indices]
    held_out = [examples[i] for i in sorted(eval_indices)]
    return train, held_out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict[str, Any]:
    """Runs SFT on the data named in `config.data`, in `workdir`.

    Returns:
      The final metrics ("train/...", "eval/..."), "steps", "train_examples",
      "eval_examples" and "model_dir".
    """
    if not config.init_from:
        raise ValueError(
            "config.init_from is empty; set it to a pretrained model (a Hugging Face folder, a "
            "llama2.c .bin file or a folder exported by this project) or 'random:<variant>'."
        )
    if not config.data.tokenizer:
        raise ValueError("config.data.tokenizer is empty; set it to a tokenizer.model file or "
                         "a Hugging Face tokenizer folder.")
    tokenizer = load_tokenizer(config.data.tokenizer)
    examples, eval_examples = load_data(config.data, tokenizer)
    logging.info("SFT on %d dialogues (%d held out for evaluation).", len(examples),
                 len(eval_examples))
    result = train_on_examples(config, workdir, examples, tokenizer=tokenizer,
                               eval_examples=eval_examples or None)
    return {**result.metrics, "steps": result.steps, "train_examples": len(examples),
            "eval_examples": len(eval_examples), "model_dir": str(result.model_dir)}
