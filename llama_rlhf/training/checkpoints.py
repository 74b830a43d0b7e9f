"""Orbax checkpoints of a run (resume) and model export between stages.

A run's workdir keeps its train checkpoints under `checkpoints/`: the whole `TrainState` plus a
JSON dictionary (data position, RNG seed, stage metadata) per saved step, the last
`max_to_keep` of them. A finished stage exports its model with `save_model` to a folder holding
`params/` (orbax) and `model.json` (the `LlamaConfig`, the head and metadata such as a reward
model's score statistics); the next stage starts from it with `load_initial_params`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from llama_rlhf.model import LlamaConfig, get_variant, init_params, param_shapes, param_shardings
from llama_rlhf.model.hf_checkpoint import config_from_hf, load_hf_checkpoint
from llama_rlhf.model.llama2c_checkpoint import load_llama2c_checkpoint


def _drop_orbax_info(record: logging.LogRecord) -> bool:
    """Keeps orbax's warnings and errors but not its dozens of INFO lines per save."""
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


# orbax logs through absl's logger, which the training log shares.
logging.getLogger("absl").addFilter(_drop_orbax_info)

MODEL_FILE = "model.json"
PARAMS_DIR = "params"
MODEL_FORMAT_VERSION = 1

# Parameters that exist for one head only.
HEAD_PARAMS = {"lm": ("lm_head",), "scalar": ("score_head", "score_bias"), "none": ()}


class Checkpointer:
    """Saves and restores train states with an orbax `CheckpointManager`.

    Saves run in the background; `wait()` blocks until they are on disk. A checkpoint that was
    being written when the process died is never listed, so `latest_step()` is always a
    complete one.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """Returns the step of the newest complete checkpoint, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, extra: dict[str, Any] | None = None) -> None:
        """Starts saving `state` and the JSON-serializable `extra` as checkpoint `step`."""
        extra = dict(extra or {})
        json.dumps(extra)  # Fails here, with the offending value, rather than in a thread.
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)
            ),
        )

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores checkpoint `step` (default: the latest) into the layout of `abstract_state`.

        Args:
          abstract_state: a tree of `jax.ShapeDtypeStruct`s with shardings, such as the first
            output of `train_state_shardings`; arrays are restored directly onto those shardings.
          step: the checkpoint to restore.

        Returns:
          (state, extra).

        Raises:
          FileNotFoundError: there is no checkpoint (at `step`).
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"No checkpoint {'' if step is None else step} in {self.directory}; "
                f"available steps: {self.all_steps()}."
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.extra or {})

    def wait(self) -> None:
        """Blocks until every started save is complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclasses.dataclass
class LoadedModel:
    """A model ready to use: its config, parameters, head and stage metadata."""

    config: LlamaConfig
    params: Any
    head: str
    metadata: dict[str, Any]


def _write_json_atomic(path: pathlib.Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_model(
    directory: str | os.PathLike,
    model_config: LlamaConfig,
    params,
    *,
    head: str,
    metadata: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Exports a model to `directory` (params with orbax, plus `model.json`).

    The folder is written under a temporary name and renamed into place, so `directory`
    contains either the previous complete export or the new one. An existing export is replaced.

    Returns:
      The absolute path of the export.
    """
    if head not in HEAD_PARAMS:
        raise ValueError(f"head must be one of {tuple(HEAD_PARAMS)}, got {head!r}.")
    metadata = dict(metadata or {})
    description = {
        "format_version": MODEL_FORMAT_VERSION,
        "model_config": model_config.to_dict(),
        "head": head,
        "metadata": metadata,
    }
    json.dumps(description)  # Fail before writing anything when metadata is not JSON.

    directory = pathlib.Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex}")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / PARAMS_DIR, params)
    _write_json_atomic(tmp / MODEL_FILE, description)

    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory


def _read_model_description(directory: pathlib.Path) -> dict[str, Any]:
    path = directory / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a model saved by save_model."
        )
    try:
        description = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from error
    for key in ("format_version", "model_config", "head"):
        if key not in description:
            raise ValueError(f"{path} is missing the field {key!r}.")
    if description["format_version"] != MODEL_FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {description['format_version']}, but this code reads "
            f"version {MODEL_FORMAT_VERSION}."
        )
    return description


def _config_with_overrides(config: LlamaConfig, overrides: dict[str, Any] | None,
                           source: str) -> LlamaConfig:
    """Applies numeric overrides (dtype, remat...) that must not change any parameter shape."""
    if not overrides:
        return config
    unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(LlamaConfig)})
    if unknown:
        raise ValueError(f"Unknown LlamaConfig fields {unknown} in the overrides for {source}.")
    new = config.replace(**overrides)
    old_shapes = jax.tree.map(lambda x: x.shape, param_shapes(config, "none"))
    new_shapes = jax.tree.map(lambda x: x.shape, param_shapes(new, "none"))
    if old_shapes != new_shapes or new.vocab_size != config.vocab_size:
        raise ValueError(
            f"The overrides {overrides} change parameter shapes of the model loaded from {source}; "
            "only numeric settings such as dtype, param_dtype or remat_policy may be overridden."
        )
    return new


def _target_shardings(config: LlamaConfig, head: str, mesh: Mesh | None):
    if mesh is not None:
        return param_shardings(config, mesh, head)
    device = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, param_shapes(config, head))


def load_model(
    directory: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    model_config_overrides: dict[str, Any] | None = None,
) -> LoadedModel:
    """Loads a model exported with `save_model`, sharded over `mesh` when one is given.

    Args:
      directory: the export folder.
      mesh: restore directly onto the parameter shardings of this mesh; without a mesh the
        parameters go to the first device.
      model_config_overrides: LlamaConfig fields to change that leave shapes alone (dtype,
        param_dtype, remat_policy); parameters are cast to the new param_dtype.
    """
    directory = pathlib.Path(directory).absolute()
    description = _read_model_description(directory)
    try:
        saved_config = LlamaConfig(**description["model_config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{directory / MODEL_FILE}: invalid model_config: {error}") from error
    head = description["head"]
    config = _config_with_overrides(saved_config, model_config_overrides, str(directory))

    shardings = _target_shardings(config, head, mesh)
    stored = param_shapes(saved_config, head)
    abstract = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        stored,
        shardings,
    )
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / PARAMS_DIR, abstract)
    if config.param_dtype != saved_config.param_dtype:
        params = jax.tree.map(lambda x: x.astype(config.jnp_param_dtype), params)
    return LoadedModel(config=config, params=params, head=head,
                       metadata=dict(description.get("metadata", {})))


def convert_head(
    loaded: LoadedModel, head: str, rng: jax.Array, mesh: Mesh | None = None
) -> LoadedModel:
    """Swaps the output head of a model, keeping the transformer.

    lm -> scalar drops `lm_head` and adds a freshly initialized score head (how Llama 2's reward
    models start from a chat model checkpoint); lm or scalar -> none drops the head; none ->
    scalar adds a fresh score head. A language-model head cannot be created from nothing,
    so none/scalar -> lm is rejected unless the embeddings are tied.
    """
    if head not in HEAD_PARAMS:
        raise ValueError(f"head must be one of {tuple(HEAD_PARAMS)}, got {head!r}.")
    if head == loaded.head:
        return loaded
    config = loaded.config
    if head == "lm" and not config.tie_word_embeddings:
        raise ValueError(
            f"Cannot turn a model with head {loaded.head!r} into a language model: it has no "
            "lm_head and its embeddings are not tied."
        )
    params = {
        name: value for name, value in loaded.params.items()
        if name not in HEAD_PARAMS[loaded.head]
    }
    new_names = HEAD_PARAMS[head]
    if new_names:
        # Only the new head's leaves are computed; XLA drops the rest of the initializer.
        fresh = jax.jit(lambda key: {name: init_params(config, key, head)[name]
                                     for name in new_names})(rng)
        params.update(fresh)
    shardings = _target_shardings(config, head, mesh)
    params = jax.device_put(params, shardings)
    return LoadedModel(config=config, params=params, head=head, metadata=dict(loaded.metadata))


def initial_model_config(
    init_from: str, *, model_config_overrides: dict[str, Any] | None = None
) -> LlamaConfig:
    """Returns the LlamaConfig that `load_initial_params` would return, reading no weights
    (except for a llama2.c file, whose shapes are read by loading it)."""
    overrides = dict(model_config_overrides or {})
    if init_from.startswith("random:"):
        return get_variant(init_from.split(":", 1)[1], **overrides)
    path = pathlib.Path(init_from).expanduser()
    if (path / MODEL_FILE).is_file():
        description = _read_model_description(path)
        try:
            saved = LlamaConfig(**description["model_config"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path / MODEL_FILE}: invalid model_config: {error}") from error
        return _config_with_overrides(saved, overrides, str(path))
    if (path / "config.json").is_file():
        config = config_from_hf(json.loads((path / "config.json").read_text()),
                                source=str(path / "config.json"))
        if "param_dtype" in overrides:
            config = config.replace(param_dtype=overrides["param_dtype"])
        return _config_with_overrides(config, overrides, str(path))
    return load_initial_params(init_from, head="lm", rng=jax.random.key(0),
                               model_config_overrides=overrides).config


def load_initial_params(
    init_from: str,
    *,
    head: str,
    rng: jax.Array,
    mesh: Mesh | None = None,
    model_config_overrides: dict[str, Any] | None = None,
) -> LoadedModel:
    """Loads the starting point of a stage, converted to `head`.

    Args:
      init_from: one of
        - "random:<variant>": a fresh initialization of a `llama_rlhf.model.VARIANTS` entry
          (the overrides may change any field, shapes included);
        - a folder written by `save_model` (contains model.json);
        - a Hugging Face Llama folder (contains config.json);
        - a llama2.c checkpoint file ending in ".bin".
      head: the head the stage trains ("lm", "scalar" or "none").
      rng: used for fresh parameters (random init, a new score head).
      mesh: the mesh to shard over; None places everything on the first device.
      model_config_overrides: LlamaConfig fields to change. For a loaded checkpoint only
        fields that keep parameter shapes (dtype, param_dtype, remat_policy) are accepted.
    """
    if init_from.startswith("random:"):
        variant = init_from.split(":", 1)[1]
        config = get_variant(variant, **dict(model_config_overrides or {}))
        params = init_params(config, rng, head, mesh)
        return LoadedModel(config=config, params=params, head=head,
                           metadata={"init_from": init_from})

    path = pathlib.Path(init_from).expanduser()
    if (path / MODEL_FILE).is_file():
        loaded = load_model(path, mesh=mesh, model_config_overrides=model_config_overrides)
    elif (path / "config.json").is_file():
        loaded = _load_foreign(path, "hf", model_config_overrides, mesh)
    elif path.suffix == ".bin" and path.is_file():
        loaded = _load_foreign(path, "llama2c", model_config_overrides, mesh)
    elif not path.exists():
        raise FileNotFoundError(
            f"init_from {init_from!r} not found; expected 'random:<variant>', a folder from "
            "save_model, a Hugging Face folder or a llama2.c .bin file."
        )
    else:
        raise ValueError(
            f"init_from {init_from!r} is neither a save_model folder (model.json), a Hugging "
            "Face folder (config.json) nor a llama2.c .bin file."
        )
    loaded.metadata.setdefault("init_from", str(path.absolute()))
    return convert_head(loaded, head, rng, mesh)


def _load_foreign(path: pathlib.Path, kind: str, overrides: dict[str, Any] | None,
                  mesh: Mesh | None) -> LoadedModel:
    """Imports a Hugging Face folder or a llama2.c file as a language model."""
    overrides = dict(overrides or {})
    dtype = overrides.get("param_dtype")
    if kind == "hf":
        config, params = load_hf_checkpoint(path, dtype=dtype, mesh=mesh, head="lm")
    else:
        config, params = load_llama2c_checkpoint(path, dtype=dtype)
    config = _config_with_overrides(config, overrides, str(path))
    params = jax.device_put(params, _target_shardings(config, "lm", mesh))
    return LoadedModel(config=config, params=params, head="lm", metadata={})
