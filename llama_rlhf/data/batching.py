"""Fixed-shape numpy batches for reward-model training, SFT and sampling.

Every batch states explicitly which positions contain real tokens (`mask`, `lengths`).
Padded positions contain `pad_id`, which for Llama 2 equals the EOS id, so no code may infer
padding from token values. Sequence length is always the requested `max_length`/`length`, so
a jitted step sees one shape.

Reward batches stack the two answers on axis 1: index 0 is the chosen answer, index 1 the
rejected one. Each sequence is the Llama 2 chat encoding of context + answer, ending with the
answer's EOS, right-padded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from llama_rlhf.data.chat import Message, encode_for_training
from llama_rlhf.data.preferences import Comparison
from llama_rlhf.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

UNKNOWN_SAFETY = -1


@dataclasses.dataclass(frozen=True)
class FittedComparison:
    """A comparison's two token sequences after the truncation policy.

    Attributes:
        chosen_ids: Ids of context + chosen answer, at most `max_length` long.
        rejected_ids: Ids of context + rejected answer, at most `max_length` long.
        dropped_turns: Number of oldest context exchanges (user + assistant) removed.
        cut_tokens: Whether tokens had to be cut from the start of the final exchange.
    """

    chosen_ids: list[int]
    rejected_ids: list[int]
    dropped_turns: int
    cut_tokens: bool

    @property
    def truncated(self) -> bool:
        """Whether anything of the comparison was removed."""
        return self.dropped_turns > 0 or self.cut_tokens


def fit_comparison(
    comparison: Comparison, tokenizer: Tokenizer, max_length: int
) -> FittedComparison:
    """Encode a comparison's two dialogs so that each fits into `max_length` tokens.

    Truncation policy, applied to chosen and rejected together so both keep the same context:

      1. Encode context + answer in the Llama 2 chat format (`encode_for_training`).
      2. While the longer sequence exceeds `max_length` and the context has earlier
         exchanges, drop the oldest exchange (a user turn and its assistant answer). A system
         message is kept and merged into the new first user turn, as the format requires.
      3. If even the final user turn plus the answer does not fit, cut tokens from the start
         of each overlong sequence and put BOS back in front: the result is BOS followed by
         the last `max_length - 1` tokens. This keeps the end of the prompt, the whole answer
         and its EOS when the answer is shorter than `max_length - 1`; a longer answer keeps
         only its last tokens. The cut sequence no longer starts with "[INST]".

    Args:
        comparison: The comparison.
        tokenizer: The tokenizer.
        max_length: Maximum sequence length in tokens, at least 2.
    """
    if max_length < 2:
        raise ValueError(f"max_length is {max_length}, expected at least 2 (BOS and EOS)")

    context = list(comparison.context)
    system = context[:1] if context[0].role == "system" else []
    turns = context[len(system) :]
    num_earlier_exchanges = (len(turns) - 1) // 2

    for dropped in range(num_earlier_exchanges + 1):
        remaining: list[Message] = system + turns[2 * dropped :]
        chosen_ids, _ = encode_for_training(
            tokenizer, [*remaining, Message("assistant", comparison.chosen)]
        )
        rejected_ids, _ = encode_for_training(
            tokenizer, [*remaining, Message("assistant", comparison.rejected)]
        )
        if max(len(chosen_ids), len(rejected_ids)) <= max_length:
            return FittedComparison(chosen_ids, rejected_ids, dropped, cut_tokens=False)

    return FittedComparison(
        _keep_bos_and_tail(chosen_ids, tokenizer.bos_id, max_length),
        _keep_bos_and_tail(rejected_ids, tokenizer.bos_id, max_length),
        dropped_turns=num_earlier_exchanges,
        cut_tokens=True,
    )


def _keep_bos_and_tail(ids: list[int], bos_id: int, max_length: int) -> list[int]:
    if len(ids) <= max_length:
        return ids
    return [bos_id, *ids[len(ids) - (max_length - 1) :]]


def pack_comparisons(
    comparisons: Sequence[Comparison],
    tokenizer: Tokenizer,
    max_length: int,
    *,
    pad_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Tokenize comparisons and stack them into a reward-model batch.

    Sequences longer than `max_length` are shortened by the policy of `fit_comparison`; the
    number of truncated comparisons is logged and flagged per row in `truncated`.

    Args:
        comparisons: B comparisons.
        tokenizer: The tokenizer.
        max_length: T, the padded sequence length.
        pad_id: Id written into padding; defaults to `tokenizer.pad_id`.

    Returns:
        A dict of numpy arrays:
          tokens: int32 [B, 2, T], index 0 chosen and 1 rejected, right-padded with pad_id.
          mask: bool [B, 2, T], True at real tokens.
          lengths: int32 [B, 2], number of real tokens.
          level: int32 [B], the `PreferenceLevel` value.
          is_safety: bool [B], whether the prompt is a safety prompt.
          safe: int32 [B, 2], 1 safe, 0 unsafe, -1 not annotated (chosen, rejected).
          truncated: bool [B], whether the truncation policy removed anything.
    """
    pad_id = tokenizer.pad_id if pad_id is None else pad_id
    fitted = [fit_comparison(c, tokenizer, max_length) for c in comparisons]
    batch_size = len(comparisons)

    tokens = np.full((batch_size, 2, max_length), pad_id, dtype=np.int32)
    lengths = np.zeros((batch_size, 2), dtype=np.int32)
    for row, item in enumerate(fitted):
        for side, ids in enumerate((item.chosen_ids, item.rejected_ids)):
            tokens[row, side, : len(ids)] = ids
            lengths[row, side] = len(ids)
    # mask[b, s, t] = t < lengths[b, s]
    mask = np.arange(max_length)[None, None, :] < lengths[:, :, None]

    truncated = np.array([item.truncated for item in fitted], dtype=bool)
    num_cut = sum(item.cut_tokens for item in fitted)
    if truncated.any():
        log.info(
            "Truncated %d of %d comparisons to max_length=%d (%d of them cut inside the "
            "final exchange)",
            int(truncated.sum()),
            batch_size,
            max_length,
            num_cut,
        )

    return {
        "tokens": tokens,
        "mask": mask,
        "lengths": lengths,
        "level": np.array([int(c.level) for c in comparisons], dtype=np.int32),
        "is_safety": np.array([c.is_safety_prompt for c in comparisons], dtype=bool),
        "safe": np.array(
            [[_safety_code(c.chosen_safe), _safety_code(c.rejected_safe)] for c in comparisons],
            dtype=np.int32,
        ).reshape(batch_size, 2),
        "truncated": truncated,
    }


def _safety_code(safe: bool | None) -> int:
    return UNKNOWN_SAFETY if safe is None else int(safe)


def pack_sft(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_length: int,
    pad_id: int,
    *,
    truncate: bool = False,
) -> dict[str, np.ndarray]:
    """Stack `(ids, loss_mask)` examples, as `encode_for_training` returns them, into a batch.

    `loss_mask[b, t]` marks `tokens[b, t]` as a target, so a next-token loss compares the
    logits at position t - 1 with `tokens[b, t]` wherever `loss_mask[b, t]` is True.

    Args:
        examples: B pairs of equally long id and loss-mask lists.
        max_length: T, the padded sequence length.
        pad_id: Id written into padding.
        truncate: Keep the first `max_length` tokens of longer examples (and log how many
            were cut) instead of raising ValueError.

    Returns:
        A dict of numpy arrays:
          tokens: int32 [B, T], right-padded with pad_id.
          mask: bool [B, T], True at real tokens.
          loss_mask: bool [B, T], True at target tokens.
    """
    batch_size = len(examples)
    tokens = np.full((batch_size, max_length), pad_id, dtype=np.int32)
    mask = np.zeros((batch_size, max_length), dtype=bool)
    loss_mask = np.zeros((batch_size, max_length), dtype=bool)
    num_cut = 0
    for row, (ids, example_loss_mask) in enumerate(examples):
        if len(ids) != len(example_loss_mask):
            raise ValueError(
                f"example {row} has {len(ids)} ids but a loss mask of length "
                f"{len(example_loss_mask)}, expected equal lengths"
            )
        if len(ids) > max_length:
            if not truncate:
                raise ValueError(
                    f"example {row} has {len(ids)} tokens, more than max_length={max_length}; "
                    "pass truncate=True to keep its first max_length tokens"
                )
            num_cut += 1
        length = min(len(ids), max_length)
        tokens[row, :length] = ids[:length]
        mask[row, :length] = True
        loss_mask[row, :length] = np.asarray(example_loss_mask[:length], dtype=bool)
    if num_cut:
        log.info("Cut %d of %d SFT examples to max_length=%d", num_cut, batch_size, max_length)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Left-pad prompts for sampling, so that every prompt ends at the last position.

    Args:
        prompts: B non-empty id lists, each at most `length` long.
        length: T, the padded length.
        pad_id: Id written into padding.

    Returns:
        A dict of numpy arrays: tokens int32 [B, T] and mask bool [B, T], True at real tokens.
    """
    batch_size = len(prompts)
    tokens = np.full((batch_size, length), pad_id, dtype=np.int32)
    mask = np.zeros((batch_size, length), dtype=bool)
    for row, ids in enumerate(prompts):
        if not 0 < len(ids) <= length:
            raise ValueError(
                f"prompt {row} has {len(ids)} tokens, expected between 1 and length={length}"
            )
        tokens[row, length - len(ids) :] = ids
        mask[row, length - len(ids) :] = True
    return {"tokens": tokens, "mask": mask}
