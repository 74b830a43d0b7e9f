"""Runs PPO with the Llama 2 reward and exports the policy; see configs/ppo.py for the variants.

  python -m experiments.ppo --config=configs/ppo.py:tiny --workdir=/tmp/ppo_tiny
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from llama_rlhf.ppo import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "PPO config file and variant, e.g. configs/ppo.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for config.json, checkpoints, metrics, the synthetic setup (tiny) "
    "and the exported policy; rerunning with the same folder resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
