"""Runs notebooks/quickstart.ipynb from top to bottom, so that it cannot fall behind the code.

The kernel is this interpreter's python3 kernel, started from the repository root with one CPU
device, because the test process has 8 fake ones. It uses the session's JAX compilation cache,
so it loads the programs that other runs of the smoke config compiled.
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def kernel_env(cache: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def test_quickstart_notebook_runs(tmp_path_factory):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}})
    cache = tmp_path_factory.getbasetemp() / "rlhf_compilation_cache"
    try:
        client.execute(env=kernel_env(cache))
    except CellExecutionError as error:
        pytest.fail(f"A cell of {NOTEBOOK.name} failed:\n{error}")

    outputs = [output for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    # The summary printed by the last cell has one line per policy.
    assert "RM win vs SFT" in text
    for name in ("SFT", "V1", "V2"):
        assert f"\n{name} " in text
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert images, "the last cell shows the gold-score plot"
