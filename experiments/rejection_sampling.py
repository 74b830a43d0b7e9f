"""Runs one iteration of rejection-sampling fine-tuning; see configs/rejection_sampling.py.

  python -m experiments.rejection_sampling --config=configs/rejection_sampling.py:tiny \\
    --workdir=/tmp/rs_tiny
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from llama_rlhf.rejection_sampling import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Rejection-sampling config file and variant, e.g. "
    "configs/rejection_sampling.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for the samples, selected.jsonl, the best-of-N curves, the "
    "fine-tuning checkpoints and the exported model; rerunning with the same folder resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
