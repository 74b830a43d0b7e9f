"""Logical axis names, the one rules table that maps them to the mesh, and mesh creation.

Models and training code name array dimensions with the logical axes below and never with
physical mesh axes. `AXIS_RULES` decides where each logical axis goes on the mesh
(`data`, `fsdp`, `tensor`), so changing the parallelism strategy is a change of this table
or of the mesh shape, not of the model.

A mesh axis is dropped from a dimension's sharding when it does not divide that dimension
(for example 4 key/value heads on a tensor axis of 8, or a batch of 1). That dimension is
then replicated over the axis instead of failing to compile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Physical mesh axes.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Logical axes of parameters.
LAYERS = "layers"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab"
SCALAR = "scalar"

# Logical axes of activations.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
CACHE_LENGTH = "cache_length"

# The one table from logical axes to mesh axes. Parameters are sharded over `fsdp` along the
# embedding dimension (ZeRO-3 style) and over `tensor` along heads, MLP and vocabulary
# (Megatron style); activations are sharded over `data` and `fsdp` along the batch.
AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (LAYERS, None),
    (EMBED, FSDP),
    (MLP, TENSOR),
    (HEADS, TENSOR),
    (KV_HEADS, TENSOR),
    (HEAD_DIM, None),
    (VOCAB, TENSOR),
    (SCALAR, None),
    (BATCH, (DATA, FSDP)),
    (LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, TENSOR),
    (ACT_KV_HEADS, TENSOR),
    (ACT_MLP, TENSOR),
    (ACT_VOCAB, TENSOR),
    (CACHE_LENGTH, None),
)


def create_mesh(
    shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Creates a (data, fsdp, tensor) mesh over `devices` (default: all devices).

    Args:
      shape: the size of each mesh axis; one axis may be -1 to take the remaining devices.
        Missing axes have size 1. The default puts every device on `fsdp`.
      devices: the devices to use, all of `jax.devices()` by default.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {FSDP: -1})
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"Unknown mesh axes {unknown}; expected a subset of {MESH_AXES}.")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {shape}.")
    if -1 in sizes:
        known = math.prod(size for size in sizes if size != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {shape}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available."
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh_shape: Mapping[str, int] | None = None,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = AXIS_RULES,
) -> PartitionSpec:
    """Maps logical axis names to a `PartitionSpec` with the rules table.

    When `shape` and `mesh_shape` are given, a mesh axis that does not divide its dimension,
    or that an earlier dimension already uses, is dropped so the spec is always valid.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for index, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"Logical axis {name!r} has no entry in the sharding rules table.")
        target = table[name]
        mesh_axes = () if target is None else (target,) if isinstance(target, str) else target
        kept = []
        size = None if shape is None else int(shape[index])
        for axis in mesh_axes:
            if axis in used:
                continue
            if mesh_shape is not None:
                axis_size = int(mesh_shape.get(axis, 1))
                if axis_size == 1:
                    continue
                if size is not None:
                    if size % axis_size:
                        continue
                    size //= axis_size
            kept.append(axis)
            used.add(axis)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int]):
    """Returns the `NamedSharding` of an array of `shape` with the given logical axes."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, dict(mesh.shape)))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding when a mesh is set with `jax.set_mesh`.

    Without a mesh (plain single-device code) this returns `x` unchanged.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def tree_shardings(mesh: Mesh, logical_tree, shape_tree):
    """Maps a tree of logical axis tuples and a matching tree of shapes to `NamedSharding`s."""
    return jax.tree.map(
        lambda axes, value: named_sharding(mesh, axes, tuple(value.shape)),
        logical_tree,
        shape_tree,
        is_leaf=lambda node: (
            isinstance(node, tuple) and all(isinstance(item, (str, type(None))) for item in node)
        ),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Returns the sharding that places a full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Returns the sharding of a batch-major array: the leading axis over `data` and `fsdp`."""
    return named_sharding(mesh, (BATCH,) + (None,) * (len(shape) - 1), shape)
