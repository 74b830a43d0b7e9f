"""Runs supervised fine-tuning and exports the model; see configs/sft.py for the variants.

  python -m experiments.sft --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from llama_rlhf.sft import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "SFT config file and variant, e.g. configs/sft.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for config.json, checkpoints, metrics and the exported model; "
    "rerunning with the same folder resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
