"""Runs the iterative RLHF loop (SFT, then versions V1 ... Vn); see configs/rlhf.py.

  python -m experiments.rlhf --config=configs/rlhf.py:tiny --workdir=/tmp/rlhf_tiny

Rerunning the same command continues where the run stopped; finished stages are not redone.
"""

from __future__ import annotations

import pathlib
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from llama_rlhf.rlhf_loop import ConfigMismatchError, StopRequested, run_rlhf

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "RLHF loop config file and variant, e.g. configs/rlhf.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder of the run: one subfolder per version and stage, the report and "
    "the summary; rerunning with the same folder continues the run.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Continue a workdir that was started with another config; "
    "the new values apply only to stages that have not finished.")
_STOP_AFTER = flags.DEFINE_string(
    "stop_after", None, "Stop after this stage, e.g. v1/reward_safety (exit status 3); "
    "rerunning without it continues from there.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Folder of JAX's persistent compilation cache, which lets later "
    "versions and reruns load compiled programs instead of compiling them again; default "
    "<workdir>/compilation_cache, 'none' turns it off.")
flags.mark_flags_as_required(["config", "workdir"])

STOPPED_EXIT_STATUS = 3


def _enable_compilation_cache(directory: str) -> None:
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program of the tiny models compiles in well under the default threshold of 1 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    cache = _COMPILATION_CACHE.value or str(pathlib.Path(_WORKDIR.value) / "compilation_cache")
    if cache != "none":
        _enable_compilation_cache(cache)
    try:
        result = run_rlhf(_CONFIG.value, _WORKDIR.value,
                          allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                          stop_after=_STOP_AFTER.value)
    except StopRequested as stop:
        print(f"{stop} Rerun the command without --stop_after to continue.")
        sys.exit(STOPPED_EXIT_STATUS)
    except ConfigMismatchError as error:
        sys.exit(f"Error: {error}")
    print(f"\nReport: {result['report']}\n")
    print(result["summary"])


if __name__ == "__main__":
    app.run(main)
