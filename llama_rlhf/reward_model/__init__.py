"""Reward models: a Llama with a scalar head, trained with Llama 2's ranking loss with margin.

Modules:
  scoring: `score` (the scalar head at the last real token), `score_pairs`, `RewardModel`
    (a trained model loaded from its export, with the stored score mean and std).
  trainer: the loss, `train_on_comparisons` and the stage entry point `train_and_evaluate`.
  mixing: the helpfulness and safety training mixtures, and the held-out split.
  evaluation: accuracy per preference level, score gap and distribution, report files.
"""

from llama_rlhf.reward_model.evaluation import (
    accuracy_table_markdown,
    comparison_table_markdown,
    evaluate_scores,
    write_evaluation,
)
from llama_rlhf.reward_model.mixing import KINDS, mix_for_kind, split_held_out
from llama_rlhf.reward_model.scoring import RewardModel, pad_sequences, score, score_pairs
from llama_rlhf.reward_model.trainer import (
    comparison_loss,
    measure_baselines,
    pair_loss,
    train_and_evaluate,
    train_on_comparisons,
)

__all__ = [
    "KINDS",
    "RewardModel",
    "accuracy_table_markdown",
    "comparison_loss",
    "comparison_table_markdown",
    "evaluate_scores",
    "measure_baselines",
    "mix_for_kind",
    "pad_sequences",
    "pair_loss",
    "score",
    "score_pairs",
    "split_held_out",
    "train_and_evaluate",
    "train_on_comparisons",
    "write_evaluation",
]
