"""Parity tests of the Llama model against independent references.

References: Hugging Face transformers' `LlamaForCausalLM` in PyTorch (float32) on random weights
that transformers itself saved, llama2.c's C implementation (the stories260K greedy output), and
the model's own full forward pass for the KV cache, padding and multi-device checks.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_rlhf import sharding as shd
from llama_rlhf.model import KVCache, Llama, LlamaConfig, param_shapes, param_shardings
from llama_rlhf.model.hf_checkpoint import load_hf_checkpoint
from llama_rlhf.model.llama2c_checkpoint import load_llama2c_checkpoint

# transformers LlamaConfig keyword arguments of each parity case (vocab <= 256, 2 layers).
HF_CASES = {
    "multi_head": dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=4),
    "grouped_query_8q_2kv": dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                 num_attention_heads=8, num_key_value_heads=2),
    "tied": dict(vocab_size=256, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    # hidden 45 is odd, so head_dim 16 is set explicitly (q_proj is [48, 45]); MLP width 97.
    "untied_odd_sizes": dict(vocab_size=199, hidden_size=45, intermediate_size=97,
                             num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                             tie_word_embeddings=False),
    "linear_rope_scaling": dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                num_attention_heads=4, num_key_value_heads=2,
                                rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                 "rope_theta": 500.0}),
}
HF_TOLERANCE = 1e-4


def save_transformers_model(directory, seed: int, **config_kwargs):
    """Saves a random `LlamaForCausalLM` with transformers and returns the torch model.

    initializer_range 0.2 (instead of 0.02) gives logits of order 1 to 10, so errors are not
    hidden by tiny activations. The RMSNorm weights are moved away from their all-ones
    initialization, so that swapping two norms would change the logits.
    """
    torch = pytest.importorskip("torch", reason="torch is needed for the transformers parity tests")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(num_hidden_layers=2, max_position_embeddings=128,
                                         rms_norm_eps=1e-5, initializer_range=0.2,
                                         **config_kwargs)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.add_(0.2 * torch.randn_like(weight))
    model.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return model


def torch_logits(model, tokens: np.ndarray, mask=None, positions=None) -> np.ndarray:
    import torch

    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(mask, np.int64))
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions, np.int64))
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens, np.int64)), **kwargs).logits.float().numpy()


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_logits_match_transformers(tmp_path, case):
    # Expected: transformers' LlamaForCausalLM (PyTorch, float32) on the weights it saved.
    torch_model = save_transformers_model(tmp_path, seed=len(case), **HF_CASES[case])
    config, params = load_hf_checkpoint(tmp_path)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40))

    expected = torch_logits(torch_model, tokens)
    logits, _ = jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(tokens))
    max_error = float(np.max(np.abs(np.asarray(logits) - expected)))
    print(f"{case}: max |logits - transformers| = {max_error:.3g} "
          f"(logits up to {np.max(np.abs(expected)):.3g})")
    assert logits.shape == expected.shape
    assert max_error <= HF_TOLERANCE, f"{case}: max |Δ| = {max_error:.3g} > {HF_TOLERANCE}"


def test_linear_rope_scaling_is_read(tmp_path):
    # The parity case above could pass with the factor dropped if it had no effect at 40
    # positions. Check that the factor was read and that ignoring it changes the logits.
    torch_model = save_transformers_model(tmp_path, seed=3, **HF_CASES["linear_rope_scaling"])
    config, params = load_hf_checkpoint(tmp_path)
    assert config.rope_scaling_factor == 4.0
    assert config.rope_theta == 500.0
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (1, 40))
    unscaled, _ = jax.jit(Llama(config.replace(rope_scaling_factor=None)).apply)(
        {"params": params}, jnp.asarray(tokens))
    error = np.max(np.abs(np.asarray(unscaled) - torch_logits(torch_model, tokens)))
    assert error > 100 * HF_TOLERANCE


def test_left_padded_logits_match_transformers(tmp_path):
    # Expected: transformers with the same attention mask and position ids (positions counting
    # real tokens only), compared on the real tokens.
    torch_model = save_transformers_model(tmp_path, seed=5, **HF_CASES["grouped_query_8q_2kv"])
    config, params = load_hf_checkpoint(tmp_path)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (3, 12))
    lengths = np.array([12, 7, 3])
    mask = np.arange(12)[None, :] >= (12 - lengths)[:, None]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

    expected = torch_logits(torch_model, tokens, mask, positions)
    logits, _ = jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(tokens),
                                             mask=jnp.asarray(mask))
    max_error = float(np.max(np.abs(np.asarray(logits)[mask] - expected[mask])))
    assert max_error <= HF_TOLERANCE, f"max |Δ| on real tokens = {max_error:.3g}"


# ------------------------------------------------------------------------------------------------
# Decoding with the KV cache
# ------------------------------------------------------------------------------------------------


@functools.cache
def _last_logits_fn(config: LlamaConfig):
    model = Llama(config)

    @jax.jit
    def forward(params, tokens, mask, cache):
        logits, cache = model.apply({"params": params}, tokens, mask=mask, cache=cache)
        return logits[:, -1], cache

    return forward


def greedy_decode(config: LlamaConfig, params, prompt: np.ndarray, prompt_mask: np.ndarray,
                  steps: int, stop_id: int | None = None, cache_length: int | None = None):
    """Greedy decoding with the KV cache: prefill the prompt, then feed one argmax at a time.

    Returns (tokens [B, n], logits [B, n, V]) of the n <= steps generated tokens; with `stop_id`
    (batch size 1) decoding stops before emitting that id, as llama2.c's run.c does for BOS.
    `cache_length` defaults to the prompt length plus `steps`.
    """
    forward = _last_logits_fn(config)
    batch, prompt_length = prompt.shape
    cache = KVCache.create(config, batch, cache_length or prompt_length + steps)
    step_logits, cache = forward(params, jnp.asarray(prompt), jnp.asarray(prompt_mask), cache)
    all_tokens, all_logits = [], []
    real = jnp.ones((batch, 1), bool)
    for _ in range(steps):
        next_token = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
        if stop_id is not None and int(next_token[0]) == stop_id:
            break
        all_tokens.append(next_token)
        all_logits.append(step_logits)
        step_logits, cache = forward(params, next_token[:, None], real, cache)
    return np.stack(all_tokens, axis=1), np.stack(all_logits, axis=1)


def random_params(config: LlamaConfig, seed: int):
    """Random parameters: weights from N(0, 0.2²), RMSNorm scales from N(1, 0.1²).

    The weights are 10x the standard deviation of `init_params`, which gives peaked attention
    and logits of order 1 to 10, so mistakes in masking or positions show up well above float32
    rounding. numpy draws them because compiling `init_params` takes several seconds on CPU.
    """
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        if getattr(path[-1], "key", None) == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(shape.shape), jnp.float32)
        return jnp.asarray(0.2 * rng.standard_normal(shape.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=8, num_kv_heads=2, max_seq_len=64)


def test_stories260k_greedy_matches_llama2c(shared):
    # Expected: the 256 ids that llama2.c's run.c generates at temperature 0 from BOS.
    checkpoint = shared / "models" / "stories260K" / "stories260K.bin"
    reference_path = shared / "reference" / "stories260K_greedy_bos.json"
    if not checkpoint.is_file() or not reference_path.is_file():
        pytest.skip(f"{checkpoint} or {reference_path} not found")
    reference = json.loads(reference_path.read_text())
    expected = reference["generated_ids"]
    assert reference["prompt_ids"] == [1]
    assert len(expected) == 256

    config, params = load_llama2c_checkpoint(checkpoint)
    # run.c stops without printing when the model emits BOS (id 1). The reference contains no 1,
    # so all 256 steps ran there, and a full-length match here shows the stop rule agrees.
    generated, _ = greedy_decode(config, params, np.array([[1]]), np.ones((1, 1), bool),
                                 steps=256, stop_id=1)
    generated = generated[0].tolist()
    first_difference = next(
        (i for i, (a, b) in enumerate(zip(generated, expected, strict=False)) if a != b), None)
    assert first_difference is None, (
        f"first difference at step {first_difference}: got {generated[first_difference]}, "
        f"llama2.c {expected[first_difference]}")
    assert len(generated) == len(expected)


def test_cache_decode_matches_full_forward():
    # Expected: one full forward over the 16 tokens without a cache.
    params = random_params(TINY, seed=0)
    apply = jax.jit(Llama(TINY).apply)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, TINY.vocab_size, (2, 16)))
    full, _ = apply({"params": params}, tokens)

    cache = KVCache.create(TINY, batch_size=2, max_length=20)
    first, cache = apply({"params": params}, tokens[:, :7], cache=cache)
    second, cache = apply({"params": params}, tokens[:, 7:], cache=cache)
    decoded = jnp.concatenate([first, second], axis=1)
    assert int(cache.index) == 16
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(full))) > 1.0, "logits too small for the check to mean much"


def test_left_padded_batch_matches_each_prompt():
    # Expected: each prompt decoded greedily on its own, without padding.
    params = random_params(TINY, seed=1)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, TINY.vocab_size, length) for length in (5, 9, 2)]
    width, steps = max(len(p) for p in prompts), 10
    padded = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        padded[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = True

    batch_tokens, batch_logits = greedy_decode(TINY, params, padded, mask, steps)
    for row, prompt in enumerate(prompts):
        # One cache length for all prompts, so the decoding step compiles once.
        alone_tokens, alone_logits = greedy_decode(
            TINY, params, prompt[None], np.ones((1, len(prompt)), bool), steps,
            cache_length=width + steps)
        assert batch_tokens[row].tolist() == alone_tokens[0].tolist(), f"prompt {row}"
        np.testing.assert_allclose(batch_logits[row], alone_logits[0], atol=1e-5, rtol=0,
                                   err_msg=f"prompt {row}")


def test_mesh_forward_matches_single_device():
    # Expected: the same forward on one device, without a mesh.
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    params = random_params(TINY, seed=2)
    tokens = np.random.default_rng(5).integers(0, TINY.vocab_size, (4, 16))
    mask = np.ones((4, 16), bool)
    mask[1, :5] = False
    model = Llama(TINY)

    def forward(params, tokens, mask):
        return model.apply({"params": params}, tokens, mask=mask)[0]

    single = jax.jit(forward)(params, jnp.asarray(tokens), jnp.asarray(mask))

    mesh = shd.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = param_shardings(TINY, mesh)
    sharded_params = jax.device_put(params, shardings)
    q_spec = sharded_params["layers"]["attention"]["q_proj"].sharding.spec
    assert any(axis is not None for axis in q_spec), f"q_proj is replicated: {q_spec}"
    assert len(sharded_params["layers"]["attention"]["q_proj"].addressable_shards) == 8
    sharded_tokens = jax.device_put(tokens, shd.batch_sharding(mesh, tokens.shape))
    sharded_mask = jax.device_put(mask, shd.batch_sharding(mesh, mask.shape))
    with jax.set_mesh(mesh):
        sharded = jax.jit(forward)(sharded_params, sharded_tokens, sharded_mask)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=0)
