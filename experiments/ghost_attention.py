"""Runs Ghost Attention and its before/after evaluation; see configs/ghost_attention.py.

  python -m experiments.ghost_attention --config=configs/ghost_attention.py:tiny \\
    --workdir=/tmp/gatt_tiny
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from llama_rlhf.ghost_attention import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Ghost Attention config file and variant, e.g. "
    "configs/ghost_attention.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for the sampled dialogues, gatt_data.jsonl, the fine-tuning "
    "checkpoints, the exported model and the per-turn report; rerunning with the same folder "
    "resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
