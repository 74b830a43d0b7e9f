"""Trains, evaluates and exports a reward model; see configs/reward_model.py for the variants.

  python -m experiments.train_reward_model --config=configs/reward_model.py:hh_tiny \\
    --workdir=/tmp/rm_hh_tiny
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from llama_rlhf.reward_model import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Reward model config file and variant, e.g. configs/reward_model.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, metrics, the evaluation report and the exported "
    "model; rerunning with the same folder resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    summary = {key: result[key] for key in ("steps", "train_pairs", "eval_pairs",
                                            "train_seconds", "model_dir", "eval_dir")}
    summary["eval_accuracy"] = result["eval"]["accuracy"]
    print(json.dumps(summary, indent=2))
    if "comparison_table" in result:
        print(result["comparison_table"])


if __name__ == "__main__":
    app.run(main)
