"""Test set-up: 8 fake CPU devices for the multi-device tests, and the shared-data fixture."""

import os

# Must happen before jax is imported anywhere: every test process sees 8 CPU devices, so the
# mesh tests can compare a (data 2, fsdp 2, tensor 2) mesh with a single device in one process.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from llama_rlhf.paths import shared_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared() -> pathlib.Path:
    """The shared data folder; tests that use it skip when it is absent."""
    path = shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set LLAMA_RLHF_SHARED)")
    return path
