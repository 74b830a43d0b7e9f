"""Tests of the shared training machinery: optimizer, train state, steps, checkpoints, metrics,
throughput and the loop's resume and NaN handling."""

import json
import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from llama_rlhf import losses
from llama_rlhf.model import Llama, get_variant, init_params, param_shapes
from llama_rlhf.sharding import create_mesh
from llama_rlhf.training import (
    Checkpointer,
    DataOrder,
    MetricWriter,
    PerformanceMeter,
    create_train_state,
    decay_mask,
    default_loop_config,
    default_optimizer_config,
    load_initial_params,
    load_model,
    make_optimizer,
    make_schedule,
    make_train_step,
    read_metrics,
    reduce_metrics,
    save_config,
    save_model,
    train_loop,
    train_state_shardings,
)
from llama_rlhf.training import loop as loop_lib
from llama_rlhf.training.optim import warmup_steps

# A model small enough to compile in seconds; head counts divide a tensor axis of 2.
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
             num_kv_heads=2, max_seq_len=64)


def small_config(**overrides):
    return get_variant("tiny", **{**SMALL, **overrides})


def single_device_mesh():
    return create_mesh({"fsdp": 1}, jax.devices()[:1])


def lm_loss_fn(model):
    def loss_fn(params, batch, rng):
        del rng
        logits, _ = model.apply({"params": params}, batch["tokens"], mask=batch["mask"])
        loss, count = losses.sft_loss(logits, batch["tokens"], batch["loss_mask"])
        # "poison" lets a test make one step's loss NaN.
        loss = loss + jnp.where(jnp.any(batch["poison"]), jnp.nan, 0.0)
        return loss, {"loss": (loss * count, count)}

    return loss_fn


def random_batch(seed, batch_size=4, length=16, vocab_size=64, poison=False):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch_size, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, batch_size)
    mask = np.arange(length)[None] < lengths[:, None]
    loss_mask = mask & (np.arange(length)[None] >= 4)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask,
            "poison": np.full((batch_size,), poison)}


# ---------------------------------------------------------------------------------------------
# Optimizer.


def test_default_optimizer_config_llama2_values():
    # Expected values: Llama 2 paper, section 2.2 (AdamW settings) and 3.1.
    config = default_optimizer_config()
    assert config.b1 == 0.9
    assert config.b2 == 0.95
    assert config.eps == 1e-5
    assert config.weight_decay == 0.1
    assert config.grad_clip == 1.0
    assert config.warmup_fraction == 0.03
    assert config.min_warmup_steps == 5
    assert config.final_lr_fraction == 0.1
    assert config.schedule == "cosine"


def test_default_optimizer_config_rejects_unknown_field():
    with pytest.raises(KeyError, match="learning_rte"):
        default_optimizer_config(learning_rte=1e-3)


def test_warmup_steps_minimum_and_fraction():
    config = default_optimizer_config()
    # Hand computation: max(5, ceil(0.03 * N)).
    assert warmup_steps(config, 10) == 5
    assert warmup_steps(config, 100) == 5
    assert warmup_steps(config, 200) == 6
    assert warmup_steps(config, 1000) == 30


def test_cosine_schedule_against_hand_computation():
    peak, total = 2e-5, 1000
    config = default_optimizer_config(learning_rate=peak)
    schedule = make_schedule(config, total)
    warmup = 30  # max(5, ceil(0.03 * 1000))

    def expected(step):
        # Linear warm-up from 0, then cosine from the peak to 10% of it at the last step.
        if step < warmup:
            return peak * step / warmup
        progress = (step - warmup) / (total - warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    for step in [0, 1, 15, 29, 30, 31, 200, 515, 999, 1000]:
        assert float(schedule(step)) == pytest.approx(expected(step), rel=1e-5, abs=1e-12)
    assert float(schedule(warmup)) == pytest.approx(peak)
    assert float(schedule(total)) == pytest.approx(0.1 * peak)


def test_constant_schedule_warms_up_then_stays():
    config = default_optimizer_config(learning_rate=1e-6, schedule="constant")
    schedule = make_schedule(config, 100)
    # Warm-up of 5 steps (the minimum), then the peak until the end.
    assert [float(schedule(s)) for s in range(6)] == pytest.approx(
        [0.0, 0.2e-6, 0.4e-6, 0.6e-6, 0.8e-6, 1e-6])
    assert float(schedule(99)) == pytest.approx(1e-6)


def test_schedule_rejects_unknown_kind():
    config = default_optimizer_config(schedule="linear")
    with pytest.raises(ValueError, match="linear"):
        make_schedule(config, 10)


def test_decay_mask_skips_norm_scales_and_biases():
    mask = decay_mask(param_shapes(small_config(), head="scalar"))
    assert mask["embed"] is True
    assert mask["layers"]["attention"]["q_proj"] is True
    assert mask["layers"]["mlp"]["down_proj"] is True
    assert mask["score_head"] is True
    assert mask["layers"]["attention_norm"]["scale"] is False
    assert mask["layers"]["mlp_norm"]["scale"] is False
    assert mask["final_norm"]["scale"] is False
    assert mask["score_bias"] is False


def test_weight_decay_applies_only_to_masked_parameters():
    # With zero gradients Adam's update is 0, so one AdamW step only multiplies decayed
    # parameters by (1 - lr * weight_decay) and leaves the others alone.
    lr, weight_decay = 0.1, 0.5
    config = default_optimizer_config(learning_rate=lr, weight_decay=weight_decay,
                                      schedule="constant", min_warmup_steps=0,
                                      warmup_fraction=0.0)
    tx, _ = make_optimizer(config, 10)
    params = init_params(small_config(), jax.random.key(0), head="scalar")
    params["score_bias"] = jnp.ones_like(params["score_bias"])

    @jax.jit
    def one_update(params):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = one_update(params)
    np.testing.assert_allclose(new["embed"], params["embed"] * (1 - lr * weight_decay),
                               rtol=1e-6)
    np.testing.assert_allclose(new["layers"]["attention"]["q_proj"],
                               params["layers"]["attention"]["q_proj"] * (1 - lr * weight_decay),
                               rtol=1e-6)
    np.testing.assert_array_equal(new["final_norm"]["scale"], params["final_norm"]["scale"])
    np.testing.assert_array_equal(new["score_bias"], params["score_bias"])


def test_gradient_clipping_scales_to_global_norm_one():
    # A gradient of four 10s has global norm 20; clipped to norm 1 each entry is 0.5, and
    # Adam's first moment after one step is (1 - b1) * 0.5 = 0.05.
    tx, _ = make_optimizer(default_optimizer_config(grad_clip=1.0), 10)
    params = {"w": jnp.zeros((4,))}
    _, opt_state = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
    adam_state = opt_state[1][0]
    np.testing.assert_allclose(adam_state.mu["w"], np.full(4, 0.05), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Train state and train step.


def test_create_train_state_shards_params_and_moments():
    config = small_config()
    tx, _ = make_optimizer(default_optimizer_config(), 10)
    mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state, shardings = create_train_state(config, "lm", tx, mesh, jax.random.key(0))
    q_proj = state.params["layers"]["attention"]["q_proj"]  # [L, D, H, E]
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    adam_state = state.opt_state[1][0]
    assert adam_state.mu["layers"]["attention"]["q_proj"].sharding == q_proj.sharding
    assert adam_state.nu["embed"].sharding == state.params["embed"].sharding
    assert shardings.params["embed"] == state.params["embed"].sharding
    assert int(state.step) == 0


def test_create_train_state_with_given_params_keeps_them():
    config = small_config()
    tx, _ = make_optimizer(default_optimizer_config(), 10)
    params = init_params(config, jax.random.key(3))
    state, _ = create_train_state(config, "lm", tx, single_device_mesh(), jax.random.key(0),
                                  params=params)
    np.testing.assert_array_equal(state.params["embed"], params["embed"])
    # The state owns its buffers, so a train step that donates it leaves `params` usable
    # (PPO keeps the starting parameters as its reference model).
    assert state.params["embed"].unsafe_buffer_pointer() != params["embed"].unsafe_buffer_pointer()


def test_create_train_state_rejects_wrong_shapes():
    tx, _ = make_optimizer(default_optimizer_config(), 10)
    params = init_params(small_config(hidden_size=16), jax.random.key(3))
    with pytest.raises(ValueError, match="embed"):
        create_train_state(small_config(), "lm", tx, single_device_mesh(), jax.random.key(0),
                           params=params)


def _one_step(mesh, config, params, batch):
    tx, schedule = make_optimizer(default_optimizer_config(learning_rate=1e-2), 10)
    state, shardings = create_train_state(config, "lm", tx, mesh, jax.random.key(0),
                                          params=params)
    step = make_train_step(lm_loss_fn(Llama(config)), mesh=mesh, state_shardings=shardings,
                           batch_size=batch["tokens"].shape[0], schedule=schedule)
    # Two steps: the first has learning rate 0 (warm-up starts at 0).
    rng = jax.random.key(1)
    state, _ = step(state, loop_lib.shard_batch(mesh, batch), rng)
    state, metrics = step(state, loop_lib.shard_batch(mesh, batch), rng)
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def two_step_results():
    """Two train steps from the same start on a (2, 2, 2) mesh and on one device."""
    config = small_config()
    params = init_params(config, jax.random.key(0))
    batch = random_batch(0, batch_size=8)
    mesh = _one_step(create_mesh({"data": 2, "fsdp": 2, "tensor": 2}), config, params, batch)
    single = _one_step(single_device_mesh(), config, params, batch)
    return types.SimpleNamespace(params=params, batch=batch, mesh=mesh, single=single)


def test_train_step_on_mesh_equals_single_device(two_step_results):
    mesh_params, mesh_metrics = two_step_results.mesh
    single_params, single_metrics = two_step_results.single
    for name in ("loss", "grad_norm", "param_norm", "update_norm"):
        np.testing.assert_allclose(mesh_metrics[name][0], single_metrics[name][0], rtol=1e-5,
                                   err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 mesh_params, single_params)
    # The parameters moved: the comparison is not between two untouched copies.
    assert not np.allclose(single_params["embed"], two_step_results.params["embed"])


def test_train_step_metrics_are_sum_count_pairs(two_step_results):
    _, metrics = two_step_results.single
    batch = two_step_results.batch
    # Expected token counts come from the batch itself.
    assert float(metrics["tokens"][0]) == batch["mask"].sum()
    assert float(metrics["loss"][1]) == batch["loss_mask"][:, 1:].sum()
    # The second step (step index 1) of a 5-step warm-up to 1e-2.
    assert float(metrics["learning_rate"][0]) == pytest.approx(1e-2 / 5)
    assert np.isfinite(float(metrics["grad_norm"][0]))


# ---------------------------------------------------------------------------------------------
# Data order.


def test_data_order_is_a_permutation_per_epoch():
    order = DataOrder(num_examples=10, batch_size=3, seed=7)
    assert order.steps_per_epoch == 3
    epoch0 = np.concatenate([order.indices(s) for s in range(3)])
    epoch1 = np.concatenate([order.indices(s) for s in range(3, 6)])
    assert len(set(epoch0.tolist())) == 9
    assert len(set(epoch1.tolist())) == 9
    assert not np.array_equal(epoch0, epoch1)
    assert order.position(4) == {"epoch": 1, "batch_in_epoch": 1}
    # Recomputed from (seed, epoch, step) alone, e.g. after a restart.
    np.testing.assert_array_equal(DataOrder(10, 3, 7).indices(4), order.indices(4))
    assert not np.array_equal(DataOrder(10, 3, 8).indices(0), order.indices(0))


def test_data_order_rejects_too_few_examples():
    with pytest.raises(ValueError, match="fewer than one batch"):
        DataOrder(num_examples=2, batch_size=3, seed=0)


# ---------------------------------------------------------------------------------------------
# Metrics.


def test_reduce_metrics_weights_by_count():
    # Hand computation: (2 + 9) / (1 + 3) and (1 + 1) / 2.
    result = reduce_metrics([{"loss": (2.0, 1.0), "norm": (1.0, 1.0)},
                             {"loss": (9.0, 3.0), "norm": (1.0, 1.0)}])
    assert result == {"loss": pytest.approx(11 / 4), "norm": pytest.approx(1.0)}
    assert math.isnan(reduce_metrics([{"loss": (0.0, 0.0)}])["loss"])


def test_metric_writer_jsonl_tensorboard_and_purge(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.write_scalars(step, {"train/loss": 1.0 / step, "perf/mfu": np.float32(0.5)})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[1]["train/loss"] == pytest.approx(0.5)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # A run resumed at step 2 writes step 3 again: the old records from step 3 on go away.
    with MetricWriter(tmp_path, purge_step=3) as writer:
        writer.write_scalars(3, {"train/loss": 7.0})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["train/loss"] == 7.0


def test_save_config_writes_json(tmp_path):
    config = ml_collections.ConfigDict({"a": 1, "nested": {"b": "x"}})
    path = save_config(tmp_path, config)
    assert json.loads(path.read_text()) == {"a": 1, "nested": {"b": "x"}}


# ---------------------------------------------------------------------------------------------
# Throughput and MFU.


def test_peak_flops_table_lookup():
    def fake(kind):
        return types.SimpleNamespace(platform="gpu", device_kind=kind)

    # Values: vendor datasheets, dense bf16.
    assert loop_lib.peak_flops(fake("NVIDIA H100 80GB HBM3"))[0] == 989e12
    assert loop_lib.peak_flops(fake("NVIDIA H100 PCIe"))[0] == 756e12
    assert loop_lib.peak_flops(fake("NVIDIA A100-SXM4-80GB"))[0] == 312e12
    assert loop_lib.peak_flops(fake("TPU v5 lite"))[0] == 197e12
    assert loop_lib.peak_flops(fake("TPU v5"))[0] == 459e12
    assert loop_lib.peak_flops(fake("TPU v4"))[0] == 275e12
    assert loop_lib.peak_flops(fake("Some future chip"))[0] is None


def test_cpu_peak_is_measured():
    peak, source = loop_lib.peak_flops(jax.devices("cpu")[0])
    assert source == "measured peak"
    assert 1e8 < peak < 1e14


def test_performance_meter_mfu_formula(monkeypatch):
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(loop_lib.time, "perf_counter", lambda: next(clock))
    meter = PerformanceMeter(flops_per_token=1e9, devices=jax.devices()[:1])
    meter.peak, meter.num_peak_devices = 1e12, 1
    meter.reset()
    perf = meter.measure(steps=4, tokens=1000)
    # Hand computation: 4 steps and 1000 tokens in 2 s; 1e9 * 500 / 1e12 = 0.5.
    assert perf["perf/steps_per_second"] == pytest.approx(2.0)
    assert perf["perf/tokens_per_second"] == pytest.approx(500.0)
    assert perf["perf/mfu"] == pytest.approx(0.5)
    assert meter.eta_seconds(10) == pytest.approx(5.0)


def test_log_line_format():
    line = loop_lib.format_log_line(
        40, 200, {"loss": 2.3141}, {"perf/steps_per_second": 3.1,
                                    "perf/tokens_per_second": 5120.4, "perf/mfu": 0.123},
        52.0, "measured peak")
    assert line == ("step 40/200 | loss 2.314 | 3.1 steps/s | 5,120 tok/s | "
                    "MFU 12.3% (measured peak) | eta 0:00:52")


# ---------------------------------------------------------------------------------------------
# Checkpoints and model export.


def test_checkpointer_round_trip(tmp_path):
    config = small_config()
    tx, _ = make_optimizer(default_optimizer_config(), 10)
    mesh = single_device_mesh()
    state, _ = create_train_state(config, "lm", tx, mesh, jax.random.key(0))
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.latest_step() is None
        checkpointer.save(3, state, {"position": {"epoch": 1}})
        checkpointer.wait()
        assert checkpointer.latest_step() == 3
        abstract, _ = train_state_shardings(config, "lm", tx, mesh)
        restored, extra = checkpointer.restore(abstract)
    assert extra == {"position": {"epoch": 1}}
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)


def test_checkpointer_restore_without_checkpoint_raises(tmp_path):
    with Checkpointer(tmp_path / "empty") as checkpointer:
        with pytest.raises(FileNotFoundError, match="No checkpoint"):
            checkpointer.restore({})


def test_save_and_load_model(tmp_path):
    config = small_config()
    params = init_params(config, jax.random.key(0), head="scalar")
    save_model(tmp_path / "rm", config, params, head="scalar", metadata={"score_mean": 0.5})
    description = json.loads((tmp_path / "rm" / "model.json").read_text())
    assert description["head"] == "scalar"
    assert description["model_config"]["hidden_size"] == 32
    loaded = load_model(tmp_path / "rm")
    assert loaded.config == config
    assert loaded.head == "scalar"
    assert loaded.metadata == {"score_mean": 0.5}
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)

    # A second export replaces the first one.
    save_model(tmp_path / "rm", config, params, head="scalar", metadata={"score_mean": 1.5})
    assert load_model(tmp_path / "rm").metadata == {"score_mean": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]


def test_load_initial_params_converts_lm_to_scalar(tmp_path):
    config = small_config()
    params = init_params(config, jax.random.key(0))
    save_model(tmp_path / "sft", config, params, head="lm")
    mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    loaded = load_initial_params(str(tmp_path / "sft"), head="scalar", rng=jax.random.key(1),
                                 mesh=mesh)
    assert loaded.head == "scalar"
    assert "lm_head" not in loaded.params
    assert loaded.params["score_head"].shape == (32, 1)
    np.testing.assert_array_equal(loaded.params["score_bias"], np.zeros(1))
    np.testing.assert_array_equal(loaded.params["layers"]["mlp"]["up_proj"],
                                  params["layers"]["mlp"]["up_proj"])
    scores, _ = jax.jit(Llama(config, head="scalar").apply)({"params": loaded.params},
                                                            jnp.zeros((2, 3), jnp.int32))
    assert scores.shape == (2, 3)


def test_load_initial_params_random_variant_and_overrides(tmp_path):
    loaded = load_initial_params("random:tiny", head="lm", rng=jax.random.key(0),
                                 model_config_overrides=SMALL)
    assert loaded.config.hidden_size == 32
    save_model(tmp_path / "m", loaded.config, loaded.params, head="lm")
    bf16 = load_initial_params(str(tmp_path / "m"), head="lm", rng=jax.random.key(0),
                               model_config_overrides={"param_dtype": "bfloat16"})
    assert bf16.params["embed"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="change parameter shapes"):
        load_initial_params(str(tmp_path / "m"), head="lm", rng=jax.random.key(0),
                            model_config_overrides={"hidden_size": 64})


def test_load_initial_params_missing_path():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_initial_params("/nonexistent/model", head="lm", rng=jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# The loop: resume and NaN.


LOOP_STEPS = 6


@pytest.fixture(scope="module")
def loop_parts():
    """One optimizer and jitted step shared by the loop tests, so they compile once."""
    config = small_config()
    mesh = single_device_mesh()
    tx, schedule = make_optimizer(default_optimizer_config(learning_rate=1e-2), LOOP_STEPS)
    abstract, shardings = train_state_shardings(config, "lm", tx, mesh)
    step = make_train_step(lm_loss_fn(Llama(config)), mesh=mesh, state_shardings=shardings,
                           batch_size=4, schedule=schedule)
    return types.SimpleNamespace(config=config, mesh=mesh, tx=tx, abstract=abstract, step=step)


def _run_loop(parts, workdir, *, poison_step=None, on_step=None, metadata=None):
    order = DataOrder(num_examples=12, batch_size=4, seed=0)
    data = [random_batch(i, batch_size=1) for i in range(12)]

    def batch_fn(step_index):
        rows = [data[i] for i in order.indices(step_index)]
        batch = {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
        batch["poison"][:] = step_index == poison_step
        return batch

    def init_state():
        state, _ = create_train_state(parts.config, "lm", parts.tx, parts.mesh,
                                      jax.random.key(0))
        return state

    return train_loop(
        workdir=workdir,
        loop_config=default_loop_config(log_every=1, checkpoint_every=2),
        num_steps=LOOP_STEPS,
        abstract_state=parts.abstract,
        init_state=init_state,
        train_step=parts.step,
        batch_fn=batch_fn,
        rng=jax.random.key(1),
        mesh=parts.mesh,
        flops_per_token=parts.config.flops_per_token(16),
        data_order=order,
        checkpoint_metadata=metadata,
        on_step=on_step,
    )


class Interrupted(Exception):
    pass


def test_loop_resume_matches_uninterrupted_run(tmp_path, loop_parts):
    reference = _run_loop(loop_parts, tmp_path / "reference")

    def kill_at_step_5(done):
        if done == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        _run_loop(loop_parts, tmp_path / "resumed", on_step=kill_at_step_5)
    resumed = _run_loop(loop_parts, tmp_path / "resumed")
    assert resumed.resumed_from == 4
    assert resumed.step == 6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 jax.device_get(resumed.state.params), jax.device_get(reference.state.params))
    # Step 5 was logged before the interruption and again after the resume: it appears once.
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_loop_resume_rejects_changed_settings(tmp_path, loop_parts):
    # on_step runs before the step's checkpoint, so stopping at step 3 leaves the one of step 2.
    def stop_at_step_3(done):
        if done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        _run_loop(loop_parts, tmp_path / "run", metadata={"data": "a"}, on_step=stop_at_step_3)
    with pytest.raises(ValueError, match="same config"):
        _run_loop(loop_parts, tmp_path / "run", metadata={"data": "b"})


def test_loop_stops_on_nan_naming_the_step(tmp_path, loop_parts):
    # The batch of 0-based step 2 makes the loss NaN, so the 3rd completed step is named.
    with pytest.raises(FloatingPointError, match="at step 3"):
        _run_loop(loop_parts, tmp_path / "nan", poison_step=2)
    with Checkpointer(tmp_path / "nan" / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [2]
