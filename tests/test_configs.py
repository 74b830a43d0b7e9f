"""Every experiment config builds in every variant.

Convention for `configs/<name>.py`: a module-level `VARIANTS` tuple of variant names, and
`get_config(arg)` accepting "<variant>" and "<variant>,smoke" and returning a locked
ConfigDict. Config files added later are picked up here without changes to this file.
"""

import importlib
import json
import pathlib
import re

import ml_collections
import pytest

from llama_rlhf.model import LlamaConfig, get_variant
from llama_rlhf.training import default_loop_config, default_optimizer_config, make_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_MODULES = sorted(
    path.stem for path in (ROOT / "configs").glob("*.py") if path.stem != "__init__"
)


def nested_configs(config, prefix=""):
    """Yields (path, ConfigDict) for `config` and every ConfigDict inside it."""
    yield prefix or "<root>", config
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from nested_configs(value, f"{prefix}{key}.")


def check_builds(config, label):
    """Builds what a config describes: optimizers, loop settings and random-init models."""
    optimizer_fields = set(default_optimizer_config().keys())
    loop_fields = set(default_loop_config().keys())
    for path, section in nested_configs(config):
        keys = set(section.keys())
        if optimizer_fields <= keys:
            make_optimizer(section, total_steps=100)
        if loop_fields <= keys:
            assert keys == loop_fields, f"{label}: {path} has unknown loop fields"
        init_from = section.get("init_from")
        if isinstance(init_from, str) and init_from.startswith("random:"):
            overrides = section.get("model_overrides") or {}
            model_config = get_variant(init_from.split(":", 1)[1], **dict(overrides))
            assert isinstance(model_config, LlamaConfig)


def test_config_modules_found():
    assert "sft" in CONFIG_MODULES


@pytest.mark.parametrize("name", CONFIG_MODULES)
def test_every_variant_builds(name):
    module = importlib.import_module(f"configs.{name}")
    assert isinstance(module.VARIANTS, tuple) and module.VARIANTS, (
        f"configs/{name}.py must define a non-empty VARIANTS tuple"
    )
    for variant in module.VARIANTS:
        for arg in (variant, f"{variant},smoke"):
            label = f"configs/{name}.py:{arg}"
            config = module.get_config(arg)
            assert isinstance(config, ml_collections.ConfigDict), label
            assert config.is_locked, f"{label} is not locked"
            # save_config writes it as JSON at the start of every run.
            assert isinstance(json.loads(config.to_json_best_effort()), dict), label
            check_builds(config, label)


@pytest.mark.parametrize("name", CONFIG_MODULES)
def test_override_typo_raises(name):
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config(module.VARIANTS[0])
    with pytest.raises(AttributeError):
        config.no_such_field_xyz = 1
    with pytest.raises(KeyError):
        config.update_from_flattened_dict({"no_such_field_xyz": 1})
    # An existing field still accepts a value of its type.
    first_key = next(iter(config.keys()))
    config[first_key] = config[first_key]


@pytest.mark.parametrize("name", CONFIG_MODULES)
def test_unknown_variant_raises(name):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises((ValueError, KeyError), match="no_such_variant"):
        module.get_config("no_such_variant")


@pytest.mark.parametrize("name", CONFIG_MODULES)
def test_docstring_commands_name_existing_experiments(name):
    module = importlib.import_module(f"configs.{name}")
    assert module.__doc__, f"configs/{name}.py needs a docstring with its command"
    commands = re.findall(r"python -m experiments\.(\w+)", module.__doc__)
    assert commands, f"configs/{name}.py's docstring gives no 'python -m experiments.<x>' command"
    for command in commands:
        assert (ROOT / "experiments" / f"{command}.py").is_file(), (
            f"configs/{name}.py names experiments.{command}, which does not exist"
        )
