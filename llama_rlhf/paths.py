"""Locations of data outside the repository."""

import os
import pathlib

SHARED_ENV_VAR = "LLAMA_RLHF_SHARED"


def shared_dir() -> pathlib.Path:
    """Returns the folder of shared data and references.

    It is `$LLAMA_RLHF_SHARED` when set, else `../shared` next to the repository root.
    """
    value = os.environ.get(SHARED_ENV_VAR)
    if value:
        return pathlib.Path(value).expanduser().resolve()
    return (pathlib.Path(__file__).resolve().parents[2] / "shared").resolve()
