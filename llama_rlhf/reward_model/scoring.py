"""Scoring sequences with a reward model: the scalar head read at the last real token.

A reward model is the Llama decoder with head="scalar", which outputs one value per position
[B, T]. The reward of a sequence is that value at its last real token. The position comes from
the padding mask alone (`losses.last_token_index`), so left and right padding both work, and a
pad id equal to EOS cannot move it. For example, the right-padded row
[1, 7, 2, 1, 8, 9, 2, 2, 2] with 7 real tokens is scored at index 6, the second EOS.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_rlhf import losses
from llama_rlhf.model import Llama, LlamaConfig
from llama_rlhf.training.checkpoints import load_model

# Batches are padded up to a multiple of these sizes, so that scoring many batches of different
# shapes compiles only a few programs.
LENGTH_BUCKET = 64
BATCH_BUCKET = 8


@functools.partial(jax.jit, static_argnums=0)
def score(model_config: LlamaConfig, params: Any, tokens: jax.Array, mask: jax.Array
          ) -> jax.Array:
    """Scores each sequence with the scalar head at its last real token.

    r[b] = head(tokens[b])[last_token_index(mask)[b]].

    Args:
      model_config: the model shape (static: one compiled program per config).
      params: parameters of `Llama(model_config, head="scalar")`.
      tokens: int token ids [B, T], padded on either side.
      mask: [B, T], True (or 1) on real tokens.

    Returns:
      float32 rewards [B]. A row without real tokens gets a meaningless value.
    """
    # [B, T] one value per position.
    per_position, _ = Llama(model_config, head="scalar").apply(
        {"params": params}, tokens, mask=mask.astype(bool))
    return losses.gather_at(per_position, losses.last_token_index(mask))


def score_pairs(model_config: LlamaConfig, params: Any, tokens: jax.Array, mask: jax.Array
                ) -> jax.Array:
    """Scores comparison batches: tokens and mask [B, 2, T] (index 0 chosen) -> rewards [B, 2]."""
    batch, two, length = tokens.shape
    # [B, 2, T] -> [2B, T]: chosen and rejected answers go through the model as one batch.
    flat = score(model_config, params, tokens.reshape(batch * two, length),
                 mask.reshape(batch * two, length))
    return flat.reshape(batch, two)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    max_length: int,
    padding_side: str = "right",
    length_multiple: int = 1,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pads token sequences into one batch, keeping the end of any that is too long.

    A reward model reads its score at the last token, so truncation drops tokens from the
    start (the oldest context) and keeps the end of the answer.

    Args:
      sequences: token ids, one list per sequence; none may be empty.
      pad_id: id written into padding (it is never read: the mask says what is real).
      max_length: the longest sequence kept.
      padding_side: "right" or "left".
      length_multiple: the batch length is rounded up to a multiple of this, capped at
        `max_length`.

    Returns:
      (tokens int32 [N, T], mask bool [N, T], number of truncated sequences).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    for index, sequence in enumerate(sequences):
        if len(sequence) == 0:
            raise ValueError(f"Sequence {index} is empty; a reward model needs at least one token.")
    longest = max((len(s) for s in sequences), default=1)
    length = min(_round_up(min(longest, max_length), length_multiple), max_length)
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    truncated = 0
    for row, sequence in enumerate(sequences):
        kept = list(sequence)[-length:]
        truncated += len(kept) < len(sequence)
        if padding_side == "right":
            tokens[row, :len(kept)] = kept
            mask[row, :len(kept)] = True
        else:
            tokens[row, length - len(kept):] = kept
            mask[row, length - len(kept):] = True
    return tokens, mask, truncated


class RewardModel:
    """A trained reward model ready to score token sequences, with its stored score statistics.

    Load one exported by `train_and_evaluate` with `RewardModel.load(directory)`. Scores are the
    raw head outputs. `whiten` maps them to (score - score_mean) / score_std, with the mean and
    standard deviation measured on the held-out set at export time.

    Attributes:
      config: the `LlamaConfig` of the model.
      params: the parameters of `Llama(config, head="scalar")`.
      metadata: the metadata stored at export (kind, score_mean, score_std, eval, ...).
      pad_id: the id used to fill padding (never read by the model).
      max_length: the longest sequence scored; longer ones keep their last tokens.
    """

    def __init__(self, config: LlamaConfig, params: Any, metadata: Mapping[str, Any] | None = None,
                 *, pad_id: int = 0, max_length: int | None = None):
        self.config = config
        self.params = params
        self.metadata = dict(metadata or {})
        self.pad_id = pad_id
        self.max_length = config.max_seq_len if max_length is None else max_length

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mesh=None, pad_id: int | None = None,
             max_length: int | None = None) -> RewardModel:
        """Loads a model exported with head "scalar" from a project model directory.

        `pad_id` and `max_length` default to the values stored at export ("pad_id",
        "max_length" in the metadata), else to 0 and the model's max_seq_len.
        """
        loaded = load_model(directory, mesh=mesh)
        if loaded.head != "scalar":
            raise ValueError(
                f"{directory} contains a model with head {loaded.head!r}, expected head "
                "'scalar' for a reward model."
            )
        metadata = loaded.metadata
        pad_id = metadata.get("pad_id", 0) if pad_id is None else pad_id
        max_length = metadata.get("max_length") if max_length is None else max_length
        return cls(loaded.config, loaded.params, metadata, pad_id=pad_id, max_length=max_length)

    @property
    def kind(self) -> str | None:
        """"helpfulness" or "safety", as stored at export; None when not stored."""
        return self.metadata.get("kind")

    @property
    def score_mean(self) -> float:
        """Mean of the held-out scores at export time."""
        return float(self._statistic("score_mean"))

    @property
    def score_std(self) -> float:
        """Standard deviation of the held-out scores at export time."""
        return float(self._statistic("score_std"))

    def _statistic(self, name: str) -> float:
        if self.metadata.get(name) is None:
            raise KeyError(f"The reward model metadata has no {name!r}; it was exported without "
                           "an evaluation set.")
        return self.metadata[name]

    def whiten(self, scores: np.ndarray | jax.Array) -> np.ndarray:
        """Maps raw scores to (score - score_mean) / score_std."""
        return (np.asarray(scores, np.float32) - self.score_mean) / max(self.score_std, 1e-8)

    def score_tokens(self, tokens: np.ndarray | jax.Array, mask: np.ndarray | jax.Array
                     ) -> np.ndarray:
        """Scores a padded batch [B, T] (either padding side; the mask marks real tokens)."""
        tokens = np.asarray(tokens)
        mask = np.asarray(mask).astype(bool)
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(f"Expected tokens and mask of the same shape [B, T], got "
                             f"{tokens.shape} and {mask.shape}.")
        batch = tokens.shape[0]
        rows = _round_up(max(batch, 1), BATCH_BUCKET)
        # Padding rows get one real token so that they stay finite; their scores are dropped.
        tokens = np.concatenate([tokens, np.full((rows - batch, tokens.shape[1]), self.pad_id,
                                                 tokens.dtype)])
        filler = np.zeros((rows - batch, mask.shape[1]), bool)
        filler[:, 0] = True
        mask = np.concatenate([mask, filler])
        scores = score(self.config, self.params, jnp.asarray(tokens, jnp.int32),
                       jnp.asarray(mask))
        return np.asarray(scores)[:batch]

    def score_responses(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                        *, batch_size: int = 32) -> np.ndarray:
        """Scores each prompt followed by its response, all given as token ids.

        Args:
          prompts: prompt token ids (the chat-formatted dialogue up to the answer).
          responses: answer token ids, one per prompt, ending with EOS when the answer ended.
          batch_size: sequences per forward pass.

        Returns:
          float32 raw scores [N].
        """
        if len(prompts) != len(responses):
            raise ValueError(f"Expected as many prompts as responses, got {len(prompts)} and "
                             f"{len(responses)}.")
        sequences = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
        scores = []
        for start in range(0, len(sequences), batch_size):
            tokens, mask, _ = pad_sequences(
                sequences[start:start + batch_size], pad_id=self.pad_id,
                max_length=self.max_length, length_multiple=LENGTH_BUCKET)
            scores.append(self.score_tokens(tokens, mask))
        return np.concatenate(scores) if scores else np.zeros((0,), np.float32)
