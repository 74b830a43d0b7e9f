"""Tests of Hugging Face and llama2.c checkpoint import and export.

Expected values come from transformers itself: it writes the random checkpoints that are read,
reads the checkpoints that are written, and computes reference logits in PyTorch (float32).
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from llama_rlhf import sharding as shd
from llama_rlhf.model import Llama, LlamaConfig, param_shardings
from llama_rlhf.model.hf_checkpoint import (
    config_from_hf,
    config_to_hf,
    hf_state_dict_to_params,
    load_hf_checkpoint,
    params_to_hf_state_dict,
    save_hf_checkpoint,
)
from llama_rlhf.model.llama2c_checkpoint import load_llama2c_checkpoint, pairs_to_halves

torch = pytest.importorskip("torch", reason="torch is needed to write reference checkpoints")
transformers = pytest.importorskip("transformers")

GQA_KWARGS = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=8,
                  num_key_value_heads=2, tie_word_embeddings=False)
TIED_KWARGS = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=4, tie_word_embeddings=True)


def make_transformers_model(seed: int, dtype=None, **config_kwargs):
    """A random `LlamaForCausalLM` with non-trivial RMSNorm weights."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, initializer_range=0.2, **config_kwargs)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.add_(0.2 * torch.randn_like(weight))
    return model if dtype is None else model.to(dtype)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def read_safetensors(directory) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder, whether in one file or in shards."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(safetensors.numpy.load_file(path))
    return tensors


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
    """A grouped-query (8 query, 2 key/value heads) checkpoint written by transformers."""
    directory = tmp_path_factory.mktemp("hf_gqa")
    model = make_transformers_model(seed=0, **GQA_KWARGS)
    model.save_pretrained(directory)
    return directory, model


def assert_same_tensors(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert actual[name].shape == expected[name].shape, name
        assert actual[name].tobytes() == expected[name].tobytes(), f"{name} differs"


def assert_same_params(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [GQA_KWARGS, TIED_KWARGS], ids=["untied_gqa", "tied"])
def test_round_trip_is_bit_exact(tmp_path, kwargs):
    # Expected: the tensors transformers wrote, byte for byte, under the same names.
    model = make_transformers_model(seed=1, **kwargs)
    model.save_pretrained(tmp_path / "hf")
    config, params = load_hf_checkpoint(tmp_path / "hf")
    save_hf_checkpoint(tmp_path / "ours", config, params)
    assert_same_tensors(read_safetensors(tmp_path / "ours"), read_safetensors(tmp_path / "hf"))
    assert config_from_hf(json.loads((tmp_path / "ours" / "config.json").read_text())) == config


def test_bfloat16_round_trip_is_bit_exact(tmp_path):
    # Expected: the bfloat16 tensors transformers wrote, byte for byte.
    model = make_transformers_model(seed=2, dtype=torch.bfloat16, **GQA_KWARGS)
    model.save_pretrained(tmp_path / "hf")
    config, params = load_hf_checkpoint(tmp_path / "hf")
    assert config.param_dtype == "bfloat16"
    assert params["embed"].dtype == jnp.bfloat16
    save_hf_checkpoint(tmp_path / "ours", config, params)
    original = read_safetensors(tmp_path / "hf")
    assert original["model.embed_tokens.weight"].dtype.name == "bfloat16"
    assert_same_tensors(read_safetensors(tmp_path / "ours"), original)

    # Casting on load: float32 parameters hold exactly the bfloat16 values.
    config32, params32 = load_hf_checkpoint(tmp_path / "hf", dtype="float32")
    assert config32.param_dtype == "float32"
    np.testing.assert_array_equal(np.asarray(params32["embed"]),
                                  np.asarray(params["embed"]).astype(np.float32))


def test_state_dict_mapping_round_trip(gqa_checkpoint):
    # Expected: the inverse mapping returns the original tensors exactly.
    directory, _ = gqa_checkpoint
    state = read_safetensors(directory)
    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    params = hf_state_dict_to_params(state, config)
    assert params["layers"]["attention"]["q_proj"].shape == (2, 64, 8, 8)
    assert params["layers"]["attention"]["k_proj"].shape == (2, 64, 2, 8)
    assert params["layers"]["attention"]["o_proj"].shape == (2, 8, 8, 64)
    assert params["lm_head"].shape == (64, 256)
    # Row h*E + e of HF's q_proj weight is query head h, element e.
    np.testing.assert_array_equal(params["layers"]["attention"]["q_proj"][1, :, 3, 5],
                                  state["model.layers.1.self_attn.q_proj.weight"][3 * 8 + 5])
    assert_same_tensors(params_to_hf_state_dict(params, config), state)


def test_sharded_save_reloads_identically(tmp_path, gqa_checkpoint):
    # Expected: the parameters loaded from transformers' single-file checkpoint.
    directory, _ = gqa_checkpoint
    config, params = load_hf_checkpoint(directory)
    save_hf_checkpoint(tmp_path / "sharded", config, params, max_shard_bytes=40_000)
    shards = sorted(path.name for path in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert not (tmp_path / "sharded" / "model.safetensors").exists()

    reloaded_config, reloaded = load_hf_checkpoint(tmp_path / "sharded")
    assert reloaded_config == config
    assert_same_params(reloaded, params)


def test_transformers_sharded_checkpoint_loads(tmp_path, gqa_checkpoint):
    # Expected: the same parameters as transformers' single-file save of the same model.
    directory, model = gqa_checkpoint
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, sharded = load_hf_checkpoint(tmp_path)
    _, single = load_hf_checkpoint(directory)
    assert_same_params(sharded, single)


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000], ids=["single_file", "sharded"])
def test_transformers_loads_saved_checkpoint(tmp_path, gqa_checkpoint, max_shard_bytes):
    # Expected: the logits of the torch model that wrote the original checkpoint.
    directory, model = gqa_checkpoint
    config, params = load_hf_checkpoint(directory)
    save_hf_checkpoint(tmp_path / "ours", config, params, max_shard_bytes=max_shard_bytes)
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "ours", output_loading_info=True)
    reloaded.eval()
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 20))
    np.testing.assert_array_equal(torch_logits(reloaded.float(), tokens),
                                  torch_logits(model, tokens))


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, gqa_checkpoint):
    directory, _ = gqa_checkpoint
    config, params = load_hf_checkpoint(directory)
    target = tmp_path / "ckpt"
    save_hf_checkpoint(target, config, params)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf_checkpoint(target, config, params)

    # A failed save (a scalar-head tree) leaves the old checkpoint and no temporary folder.
    bad = dict(params, score_head=np.zeros((64, 1), np.float32))
    with pytest.raises(ValueError, match="score_head"):
        save_hf_checkpoint(target, config, bad, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    save_hf_checkpoint(target, config, params, max_shard_bytes=40_000, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (target / "model.safetensors.index.json").is_file()
    assert not (target / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# Heads and sharding
# ------------------------------------------------------------------------------------------------


def test_scalar_head_replaces_lm_head(gqa_checkpoint):
    # Expected: the trunk of the LM checkpoint, unchanged, with a zero or N(0, 0.02²) score head.
    directory, _ = gqa_checkpoint
    _, lm_params = load_hf_checkpoint(directory)
    config, params = load_hf_checkpoint(directory, head="scalar")
    assert "lm_head" not in params
    np.testing.assert_array_equal(params["score_head"], np.zeros((64, 1), np.float32))
    np.testing.assert_array_equal(params["score_bias"], np.zeros((1,), np.float32))
    assert_same_params(params["layers"], lm_params["layers"])

    _, random_head = load_hf_checkpoint(directory, head="scalar", score_rng=jax.random.key(0))
    std = float(np.std(np.asarray(random_head["score_head"])))
    assert 0.01 < std < 0.03

    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 10)))
    hidden, _ = jax.jit(Llama(config, head="none").apply)({"params": params}, tokens)
    scores, _ = jax.jit(Llama(config, head="scalar").apply)({"params": random_head}, tokens)
    assert scores.shape == (2, 10)
    np.testing.assert_allclose(scores, (hidden @ random_head["score_head"])[..., 0], atol=1e-5)


def test_load_onto_mesh_shards_params(gqa_checkpoint):
    # Expected: the single-device parameters, placed with param_shardings.
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    directory, _ = gqa_checkpoint
    mesh = shd.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config, params = load_hf_checkpoint(directory, mesh=mesh)
    _, single = load_hf_checkpoint(directory)
    expected_shardings = param_shardings(config, mesh)
    for actual, expected in zip(jax.tree.leaves(params), jax.tree.leaves(expected_shardings),
                                strict=True):
        assert actual.sharding == expected
    assert params["layers"]["attention"]["q_proj"].sharding.spec != (None,) * 4
    assert_same_params(params, single)


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------


def test_config_round_trip_through_transformers():
    # Expected: transformers' own reading of our config.json gives the same shapes back.
    config = LlamaConfig(vocab_size=199, hidden_size=45, intermediate_size=97, num_layers=3,
                         num_heads=3, num_kv_heads=1, head_dim=16, max_seq_len=96,
                         rms_norm_eps=1e-6, rope_theta=500.0, rope_scaling_factor=2.0)
    hf_dict = config_to_hf(config)
    assert config_from_hf(hf_dict) == config
    hf_config = transformers.LlamaConfig(**hf_dict)
    assert hf_config.head_dim == 16
    assert hf_config.num_key_value_heads == 1
    assert hf_config.rope_parameters["rope_type"] == "linear"
    assert hf_config.rope_parameters["factor"] == 2.0
    assert hf_config.rope_parameters["rope_theta"] == 500.0
    assert config_from_hf(hf_config.to_dict()) == config


def test_config_reads_transformers_4_layout():
    # Expected: the fields of a transformers 4.x Llama 2 7B config.json.
    hf_dict = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_hidden_layers": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "vocab_size": 32000, "pretraining_tp": 1,
        "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
    }
    assert config_from_hf(hf_dict) == LlamaConfig(max_seq_len=4096, rope_scaling_factor=2.0)
    del hf_dict["rope_scaling"]
    assert config_from_hf(hf_dict).rope_scaling_factor is None


def test_config_logs_unknown_fields(caplog):
    hf_dict = config_to_hf(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_layers=1, num_heads=4, num_kv_heads=4))
    hf_dict["brand_new_field"] = 3
    with caplog.at_level(logging.WARNING):
        config_from_hf(hf_dict)
    assert "brand_new_field" in caplog.text


@pytest.mark.parametrize(
    ("change", "expected_words"),
    [
        ({"architectures": ["MistralForCausalLM"]}, ["architectures", "LlamaForCausalLM"]),
        ({"model_type": "mistral"}, ["model_type", "'llama'"]),
        ({"attention_bias": True}, ["attention_bias", "False"]),
        ({"mlp_bias": True}, ["mlp_bias", "False"]),
        ({"hidden_act": "gelu"}, ["hidden_act", "'silu'"]),
        ({"attention_dropout": 0.1}, ["attention_dropout", "0.0"]),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
         ["rope_parameters.rope_type", "'llama3'", "'linear'"]),
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
         ["rope_scaling.rope_type", "'dynamic'", "'linear'"]),
        ({"quantization_config": {"quant_method": "gptq"}}, ["quantization_config"]),
        ({"hidden_size": None}, ["hidden_size", "missing"]),
        ({"num_key_value_heads": 3}, ["num_attention_heads (4)", "num_key_value_heads (3)"]),
        ({"intermediate_size": 0}, ["intermediate_size", "positive"]),
        ({"num_hidden_layers": "2"}, ["num_hidden_layers", "integer"]),
    ],
    ids=["architecture", "model_type", "attention_bias", "mlp_bias", "hidden_act", "dropout",
         "rope_llama3", "rope_dynamic", "quantized", "missing_field", "bad_kv_heads", "zero_size",
         "not_int"],
)
def test_config_rejects_unsupported(change, expected_words):
    hf_dict = config_to_hf(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_layers=2, num_heads=4, num_kv_heads=4))
    hf_dict.update(change)
    with pytest.raises(ValueError) as error:
        config_from_hf(hf_dict, source="model/config.json")
    message = str(error.value)
    assert "model/config.json" in message
    for word in expected_words:
        assert word in message


# ------------------------------------------------------------------------------------------------
# Bad checkpoints
# ------------------------------------------------------------------------------------------------


def write_modified_checkpoint(source, target, change_tensors=None, change_config=None):
    """Copies a checkpoint folder, editing its tensors and config.json."""
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    if change_config:
        config.update(change_config)
    (target / "config.json").write_text(json.dumps(config))
    tensors = read_safetensors(source)
    if change_tensors:
        change_tensors(tensors)
    safetensors.numpy.save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_missing_tensor_is_named(tmp_path, gqa_checkpoint):
    directory, _ = gqa_checkpoint
    bad = write_modified_checkpoint(
        directory, tmp_path / "bad",
        lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj"
                                         r"\.weight \[96, 64\]"):
        load_hf_checkpoint(bad)


def test_extra_tensor_is_named(tmp_path, gqa_checkpoint):
    directory, _ = gqa_checkpoint
    bad = write_modified_checkpoint(
        directory, tmp_path / "bad",
        lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model\.layers\.2\.mlp\.up_proj"
                                         r"\.weight'\].*2 layers"):
        load_hf_checkpoint(bad)


def test_lm_head_in_tied_checkpoint_is_rejected(tmp_path, gqa_checkpoint):
    directory, _ = gqa_checkpoint
    bad = write_modified_checkpoint(directory, tmp_path / "bad",
                                    change_config={"tie_word_embeddings": True})
    with pytest.raises(ValueError, match="lm_head.weight is not expected because "
                                         "tie_word_embeddings is true"):
        load_hf_checkpoint(bad)


def test_wrong_shape_is_named(tmp_path, gqa_checkpoint):
    directory, _ = gqa_checkpoint

    def transpose_k(tensors):
        name = "model.layers.0.self_attn.k_proj.weight"
        tensors[name] = np.ascontiguousarray(tensors[name].T)

    bad = write_modified_checkpoint(directory, tmp_path / "bad", transpose_k)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has "
                                         r"shape \[64, 16\], expected \[16, 64\]"):
        load_hf_checkpoint(bad)


def test_config_shape_mismatch_is_named(tmp_path, gqa_checkpoint):
    # A config that disagrees with the tensors: 4 key/value heads where the weights have 2.
    directory, _ = gqa_checkpoint
    bad = write_modified_checkpoint(directory, tmp_path / "bad",
                                    change_config={"num_key_value_heads": 4})
    with pytest.raises(ValueError, match=r"self_attn\.k_proj\.weight has shape \[16, 64\], "
                                         r"expected \[32, 64\]"):
        load_hf_checkpoint(bad)


def test_unknown_architecture_in_folder_is_named(tmp_path, gqa_checkpoint):
    directory, _ = gqa_checkpoint
    bad = write_modified_checkpoint(directory, tmp_path / "bad",
                                    change_config={"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match=r"config\.json: unsupported architectures "
                                         r"\['GPT2LMHeadModel'\]; expected \['LlamaForCausalLM'\]"):
        load_hf_checkpoint(bad)


def test_missing_files_are_named(tmp_path, gqa_checkpoint):
    directory, _ = gqa_checkpoint
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)

    shutil.copy(directory / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin, a PyTorch pickle"):
        load_hf_checkpoint(tmp_path)

    shard = "model-00002-of-00002.safetensors"
    index = {"metadata": {}, "weight_map": {"model.norm.weight": shard}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_hf_checkpoint(tmp_path)


def test_invalid_safetensors_files_are_named(tmp_path, gqa_checkpoint):
    directory, _ = gqa_checkpoint
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        load_hf_checkpoint(tmp_path)

    # An index that places a tensor in a shard which does not contain it.
    (tmp_path / "model.safetensors").unlink()
    shutil.copy(directory / "model.safetensors", tmp_path / "model-00001-of-00001.safetensors")
    weight_map = dict.fromkeys(read_safetensors(directory), "model-00001-of-00001.safetensors")
    weight_map["model.layers.2.mlp.up_proj.weight"] = "model-00001-of-00001.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.2\.mlp\.up_proj\.weight "
                                         r"listed in model\.safetensors\.index\.json is not in "
                                         r"this shard"):
        load_hf_checkpoint(tmp_path)


def test_loading_imports_no_torch(gqa_checkpoint):
    # Loading and saving must work where torch is not installed: run them in a fresh process
    # and check that neither torch nor transformers was imported.
    directory, _ = gqa_checkpoint
    script = (
        "import sys, tempfile, pathlib\n"
        "from llama_rlhf.model.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint\n"
        f"config, params = load_hf_checkpoint({str(directory)!r})\n"
        "save_hf_checkpoint(pathlib.Path(tempfile.mkdtemp()) / 'out', config, params)\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_mixed_dtypes_need_explicit_dtype(tmp_path, gqa_checkpoint):
    directory, _ = gqa_checkpoint

    def half_norm(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float16)

    bad = write_modified_checkpoint(directory, tmp_path / "mixed", half_norm)
    with pytest.raises(ValueError, match=r"several dtypes \['F16', 'F32'\]; pass dtype="):
        load_hf_checkpoint(bad)
    config, params = load_hf_checkpoint(bad, dtype="float32")
    assert config.param_dtype == "float32"
    assert params["final_norm"]["scale"].dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# llama2.c
# ------------------------------------------------------------------------------------------------


def halves_to_pairs(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of pairs_to_halves, written out independently for the test."""
    rows, columns = weight.shape
    head_dim = rows // num_heads
    out = np.empty_like(weight)
    for head in range(num_heads):
        for i in range(head_dim // 2):
            out[head * head_dim + 2 * i] = weight[head * head_dim + i]
            out[head * head_dim + 2 * i + 1] = weight[head * head_dim + head_dim // 2 + i]
    return out


def write_llama2c(path, model, shared_classifier: bool):
    """Writes a transformers model in llama2.c's legacy (version 0) layout.

    The q and k rows go back to the adjacent-pairs order; the rotary tables are zeros because
    the loader skips them.
    """
    config = model.config
    state = {name: value.detach().float().numpy() for name, value in model.state_dict().items()}
    layers = range(config.num_hidden_layers)
    head_dim = config.hidden_size // config.num_attention_heads

    def stack(name, convert=lambda w: w):
        return np.stack([convert(state[f"model.layers.{i}.{name}"]) for i in layers])

    vocab = config.vocab_size if shared_classifier else -config.vocab_size
    header = np.array([config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                       config.num_attention_heads, config.num_key_value_heads, vocab,
                       config.max_position_embeddings], "<i4")
    tensors = [
        state["model.embed_tokens.weight"],
        stack("input_layernorm.weight"),
        stack("self_attn.q_proj.weight",
              lambda w: halves_to_pairs(w, config.num_attention_heads)),
        stack("self_attn.k_proj.weight",
              lambda w: halves_to_pairs(w, config.num_key_value_heads)),
        stack("self_attn.v_proj.weight"),
        stack("self_attn.o_proj.weight"),
        stack("post_attention_layernorm.weight"),
        stack("mlp.gate_proj.weight"),
        stack("mlp.down_proj.weight"),
        stack("mlp.up_proj.weight"),
        state["model.norm.weight"],
        np.zeros((2, config.max_position_embeddings, head_dim // 2)),
    ]
    if not shared_classifier:
        tensors.append(state["lm_head.weight"])
    with open(path, "wb") as file:
        file.write(header.tobytes())
        for tensor in tensors:
            file.write(np.ascontiguousarray(tensor, "<f4").tobytes())


def test_pairs_to_halves_matches_loop():
    weight = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    np.testing.assert_array_equal(halves_to_pairs(pairs_to_halves(weight, 2), 2), weight)
    # Head 1's row 2 (first element of rotary pair 1) moves to row 1 of that head.
    np.testing.assert_array_equal(pairs_to_halves(weight, 2)[8 + 1], weight[8 + 2])


@pytest.mark.parametrize("shared_classifier", [False, True], ids=["separate", "shared"])
def test_llama2c_logits_match_transformers(tmp_path, shared_classifier):
    # Expected: transformers' logits for the model that was written in llama2.c's layout.
    kwargs = dict(GQA_KWARGS, tie_word_embeddings=shared_classifier)
    model = make_transformers_model(seed=4, **kwargs)
    write_llama2c(tmp_path / "model.bin", model, shared_classifier)
    config, params = load_llama2c_checkpoint(tmp_path / "model.bin")
    assert config.tie_word_embeddings == shared_classifier
    assert ("lm_head" in params) == (not shared_classifier)
    assert config.num_kv_heads == 2
    tokens = np.random.default_rng(2).integers(0, 256, (2, 24))
    logits, _ = jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(logits, torch_logits(model, tokens), atol=1e-4, rtol=0)


def test_llama2c_size_errors_name_file_and_bytes(tmp_path):
    model = make_transformers_model(seed=5, **TIED_KWARGS)
    good = tmp_path / "good.bin"
    write_llama2c(good, model, shared_classifier=True)
    size = good.stat().st_size
    data = good.read_bytes()

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(data[:-4])
    with pytest.raises(ValueError, match=rf"truncated\.bin: file is truncated: {size - 4} bytes, "
                                         rf"but its header .* implies {size} bytes"):
        load_llama2c_checkpoint(truncated)

    oversized = tmp_path / "oversized.bin"
    oversized.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match=rf"oversized\.bin: file is longer than expected: "
                                         rf"{size + 8} bytes, .* implies {size} bytes"):
        load_llama2c_checkpoint(oversized)

    short = tmp_path / "short.bin"
    short.write_bytes(data[:10])
    with pytest.raises(ValueError, match=r"short\.bin: file has 10 bytes, fewer than the 28-byte"):
        load_llama2c_checkpoint(short)

    versioned = tmp_path / "v1.bin"
    versioned.write_bytes(np.array([0x616B3432, 1], "<u4").tobytes() + data[8:])
    with pytest.raises(ValueError, match=r"v1\.bin: .*versioned llama2\.c export \(version 1\)"):
        load_llama2c_checkpoint(versioned)

    bad_header = tmp_path / "bad_header.bin"
    bad_header.write_bytes(np.array([32, 64, 2, 4, 3, 128, 128], "<i4").tobytes() + data[28:])
    with pytest.raises(ValueError, match=r"bad_header\.bin: header has dim 32, n_heads 4 and "
                                         r"n_kv_heads 3"):
        load_llama2c_checkpoint(bad_header)
