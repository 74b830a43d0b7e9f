"""Tests of the batched KV-cache sampler and its teacher-forced scorer.

Independent references: transformers' `generate` in PyTorch on the same random weights, the
greedy output of llama2.c's own C implementation on the stories260K checkpoint, and plain numpy
implementations of top-k and top-p kept in this file.
"""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llama_rlhf.model import Llama, get_variant, init_params
from llama_rlhf.model.hf_checkpoint import config_to_hf, load_hf_checkpoint
from llama_rlhf.sampling import (
    SampleOutput,
    Sampler,
    SamplingConfig,
    bucket_length,
    left_pad,
    process_logits,
    response_logprobs,
    sample_from_logits,
    sequence_logprobs,
    token_logprobs,
)
from llama_rlhf.sharding import create_mesh

PAD_ID = 0
PROMPTS = [[1, 17, 43, 99, 5, 61, 7, 88, 23, 9, 54, 31],
           [1, 42, 8],
           [1, 77, 12, 90, 3, 66, 45],
           [1, 11, 29, 70, 33]]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random transformers Llama (float32) and the same weights loaded as our params."""
    config = get_variant("tiny", vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=256)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**config_to_hf(config))
    # A wider initialization than the default 0.02 spreads the logits, so float rounding
    # differences between the two frameworks are unlikely to flip a greedy argmax.
    hf_config.initializer_range = 0.2
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    model_dir = tmp_path_factory.mktemp("hf_model")
    hf_model.save_pretrained(model_dir)
    loaded_config, params = load_hf_checkpoint(model_dir)
    assert loaded_config == config
    return hf_model, config, params


def hf_greedy(hf_model, prompts, max_new_tokens, eos_id):
    """transformers' greedy generate on left-padded prompts; returns the new tokens [B, <=N]."""
    tokens, mask = left_pad(prompts, PAD_ID)
    with torch.inference_mode():
        output = hf_model.generate(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
            eos_token_id=eos_id, pad_token_id=PAD_ID)
    return output[:, tokens.shape[1]:].numpy()


def generate(sampler, prompts, seed=0, **kwargs) -> SampleOutput:
    tokens, mask = left_pad(prompts, sampler.pad_id)
    return sampler.generate(tokens, mask, jax.random.key(seed), **kwargs)


# Tests reuse these configurations where they can: samplers with equal settings share one
# compiled program, which keeps this file fast.
MAX_NEW = 16
GREEDY = SamplingConfig(greedy=True, max_new_tokens=MAX_NEW)
SAMPLED = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=MAX_NEW, num_samples=2)


@pytest.fixture(scope="module")
def free_run(hf_pair):
    """Our greedy tokens [4, MAX_NEW] without any stop token."""
    _, config, params = hf_pair
    sampler = Sampler(config, params, GREEDY, eos_id=None, pad_id=PAD_ID)
    return np.asarray(generate(sampler, PROMPTS).tokens)


@pytest.fixture(scope="module")
def sampled_run(hf_pair):
    """A `SAMPLED` run with seed 5."""
    _, config, params = hf_pair
    return generate(Sampler(config, params, SAMPLED, eos_id=None, pad_id=PAD_ID), PROMPTS, seed=5)


@pytest.fixture(scope="module")
def eos_case(hf_pair):
    """transformers' greedy tokens with and without an EOS id that ends row 1 at step 7.

    Returns (eos_id, free tokens [4, MAX_NEW], tokens with EOS [4, <= MAX_NEW], our output).
    """
    hf_model, config, params = hf_pair
    hf_free = hf_greedy(hf_model, PROMPTS, MAX_NEW, eos_id=None)
    eos_id = int(hf_free[1, 6])
    hf_with_eos = hf_greedy(hf_model, PROMPTS, MAX_NEW, eos_id=eos_id)
    sampler = Sampler(config, params, GREEDY, eos_id=eos_id, pad_id=PAD_ID)
    return eos_id, hf_free, hf_with_eos, generate(sampler, PROMPTS)


def test_greedy_matches_transformers_generate(eos_case):
    # Expected tokens: transformers' greedy generate with the same EOS, so rows stop at
    # different steps.
    _, _, expected, output = eos_case
    assert expected.shape[1] >= 7
    tokens = np.asarray(output.tokens)
    width = expected.shape[1]
    np.testing.assert_array_equal(tokens[:, :width], expected)
    # transformers stops when every row is done; our columns after that are padding.
    assert np.all(tokens[:, width:] == PAD_ID)
    assert not np.asarray(output.response_mask)[:, width:].any()


def test_greedy_without_eos_matches_transformers(hf_pair, eos_case, free_run):
    _, hf_free, _, _ = eos_case
    np.testing.assert_array_equal(free_run, hf_free)


def test_greedy_lengths_end_at_eos(eos_case):
    eos_id, hf_free, _, output = eos_case
    tokens, lengths = np.asarray(output.tokens), np.asarray(output.lengths)
    response_mask = np.asarray(output.response_mask)
    logprobs = np.asarray(output.logprobs)
    for row in range(len(PROMPTS)):
        # Expected length: one past the first EOS of the free run, else all tokens.
        hits = np.flatnonzero(hf_free[row] == eos_id)
        expected_length = int(hits[0]) + 1 if hits.size else MAX_NEW
        assert lengths[row] == expected_length
        np.testing.assert_array_equal(response_mask[row], np.arange(MAX_NEW) < expected_length)
        np.testing.assert_array_equal(tokens[row, :expected_length],
                                      hf_free[row, :expected_length])
        assert np.all(tokens[row, expected_length:] == PAD_ID)
        assert np.all(logprobs[row, expected_length:] == 0.0)
    assert lengths[1] <= 7


def test_greedy_stories260k_matches_llama2c(shared):
    import json

    from llama_rlhf.model.llama2c_checkpoint import load_llama2c_checkpoint

    reference = json.loads((shared / "reference" / "stories260K_greedy_bos.json").read_text())
    config, params = load_llama2c_checkpoint(shared / reference["checkpoint"])
    expected = reference["generated_ids"]
    # llama2.c's run.c ends a sequence when it samples BOS (id 1); it has no EOS stop.
    sampler = Sampler(config, params,
                      SamplingConfig(greedy=True, max_new_tokens=len(expected), stop_ids=(1,)),
                      eos_id=None)
    generated = sampler.generate_ids([reference["prompt_ids"]], jax.random.key(0))
    assert generated[0][0] == expected


def test_known_temperature_mismatch_values():
    # Sampling at T = 0.7 but scoring at T = 1 gives another log-prob for the same token.
    # Expected values: log softmax([2, 1, 0] / T)[0] in float64, -0.260118 and -0.407606.
    logits = jnp.array([[2.0, 1.0, 0.0]])
    target = jnp.array([0])
    for temperature in (0.7, 1.0):
        scaled = [2.0 / temperature, 1.0 / temperature, 0.0]
        expected = scaled[0] - math.log(sum(math.exp(z) for z in scaled))
        actual = token_logprobs(logits, target, temperature=temperature)
        np.testing.assert_allclose(actual, [expected], atol=1e-6)
    assert abs(token_logprobs(logits, target, 0.7)[0] - (-0.260118)) < 1e-5
    assert abs(token_logprobs(logits, target, 1.0)[0] - (-0.407606)) < 1e-5


def test_logprobs_equal_teacher_forced_scores(hf_pair):
    _, config, params = hf_pair
    sampling = SamplingConfig(temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=16,
                              num_samples=3, return_plain_logprobs=True)
    sampler = Sampler(config, params, sampling, eos_id=2, pad_id=PAD_ID)
    output = generate(sampler, PROMPTS, seed=3)
    # Expected values: one teacher-forced forward over prompt + response with the same
    # processing (no KV cache).
    scored, plain = response_logprobs(config, params, output, sampling, return_plain=True)
    response_mask = np.asarray(output.response_mask)
    sampled = np.asarray(output.logprobs)
    assert np.all(np.isfinite(sampled))
    np.testing.assert_allclose(sampled, np.asarray(scored), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(output.plain_logprobs), np.asarray(plain), atol=1e-5,
                               rtol=0)
    # The PPO ratio at step 0: exp(new - old) over the generated tokens.
    ratio = np.exp(np.asarray(scored) - sampled)[response_mask]
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)
    # Scoring at temperature 1 instead of the sampling temperature gives other values.
    wrong = sequence_logprobs(config, params, *output.full_sequences())[:, -16:]
    assert np.abs(np.asarray(wrong) - sampled)[response_mask].max() > 1e-2
    # Padding after the stop token scores 0 in both.
    assert np.all(sampled[~response_mask] == 0.0)
    assert np.all(np.asarray(scored)[~response_mask] == 0.0)


def test_sequence_logprobs_layout(hf_pair):
    hf_model, config, params = hf_pair
    tokens, mask = left_pad(PROMPTS, PAD_ID)
    logprobs = np.asarray(sequence_logprobs(config, params, tokens, mask))
    # Expected values: transformers' logits at temperature 1, position t predicting t + 1.
    with torch.inference_mode():
        logits = hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                          attention_mask=torch.from_numpy(mask.astype(np.int64))).logits
    log_probs = torch.log_softmax(logits.double(), dim=-1).numpy()
    for row in range(len(PROMPTS)):
        for t in range(tokens.shape[1]):
            if mask[row, t] and t > 0 and mask[row, t - 1]:
                expected = log_probs[row, t - 1, tokens[row, t]]
            else:
                expected = 0.0
            assert logprobs[row, t] == pytest.approx(expected, abs=1e-4)


def numpy_allowed_set(logits, top_k, top_p):
    """The token ids that top-k then top-p keep, with a plain loop over sorted tokens."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if top_k:
        order = order[:top_k]
    kept_logits = np.array([logits[i] for i in order])
    probs = np.exp(kept_logits - kept_logits.max())
    probs /= probs.sum()
    allowed, mass = [], 0.0
    for token, prob in zip(order, probs, strict=True):
        if mass >= top_p:
            break
        allowed.append(token)
        mass += prob
    return set(allowed)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (None, 0.7), (5, 0.5), (None, 0.05)])
def test_filters_never_sample_outside_allowed_set(top_k, top_p):
    # A shuffled distribution with well separated probabilities.
    probs = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.02])
    permutation = np.random.default_rng(0).permutation(len(probs))
    logits = np.log(probs[permutation])
    allowed = numpy_allowed_set(logits, top_k, top_p)
    assert 0 < len(allowed) < len(probs)

    num_draws = 20000
    sampling = SamplingConfig(top_k=top_k, top_p=top_p)
    keys = jax.random.split(jax.random.key(42), num_draws)
    tokens, logprobs, _ = sample_from_logits(
        jnp.tile(jnp.asarray(logits, jnp.float32), (num_draws, 1)), keys, sampling)
    tokens = np.asarray(tokens)
    assert set(np.unique(tokens).tolist()) == allowed
    # Frequencies follow the renormalized probabilities of the allowed set.
    allowed_ids = sorted(allowed)
    expected = np.exp(logits[allowed_ids]) / np.exp(logits[allowed_ids]).sum()
    observed = np.array([(tokens == i).mean() for i in allowed_ids])
    np.testing.assert_allclose(observed, expected, atol=0.015)
    np.testing.assert_allclose(np.exp(np.asarray(logprobs)), expected[
        np.searchsorted(allowed_ids, tokens)], rtol=1e-5)


def test_process_logits_marks_filtered_tokens():
    logits = jnp.array([[0.5, 3.0, -1.0, 2.0, 1.0]])
    processed = np.asarray(process_logits(logits, temperature=2.0, top_k=2))
    np.testing.assert_allclose(processed[0, [1, 3]], [1.5, 1.0])
    assert np.all(np.isneginf(processed[0, [0, 2, 4]]))


def test_sampled_tokens_inside_top_k_of_model(hf_pair):
    _, config, params = hf_pair
    sampling = SamplingConfig(temperature=1.5, top_k=3, max_new_tokens=10, num_samples=2)
    sampler = Sampler(config, params, sampling, eos_id=None, pad_id=PAD_ID)
    output = generate(sampler, PROMPTS, seed=7)
    tokens, mask = output.full_sequences()
    # Expected set: the 3 largest logits of a teacher-forced forward at each response step.
    logits, _ = Llama(config).apply({"params": params}, tokens, mask=mask)
    top3 = np.argsort(-np.asarray(logits)[:, -11:-1], axis=-1)[..., :3]
    generated = np.asarray(output.tokens)
    assert np.all(np.any(top3 == generated[..., None], axis=-1))
    # At temperature 1.5 over 80 draws the second or third choice must appear.
    assert np.any(top3[..., 0] != generated)


def test_tiny_temperature_equals_greedy(hf_pair, free_run):
    _, config, params = hf_pair
    assert SamplingConfig(temperature=0.0).is_greedy
    cold = Sampler(config, params, SamplingConfig(temperature=1e-6, max_new_tokens=MAX_NEW),
                   eos_id=None, pad_id=PAD_ID)
    np.testing.assert_array_equal(np.asarray(generate(cold, PROMPTS, seed=1).tokens), free_run)
    # The same on a constructed batch of logits, at temperature 0 and 1e-4.
    logits = jax.random.normal(jax.random.key(0), (256, 50))
    keys = jax.random.split(jax.random.key(1), 256)
    for temperature in (0.0, 1e-4):
        tokens, _, _ = sample_from_logits(logits, keys, SamplingConfig(temperature=temperature))
        np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), axis=-1))


def test_same_seed_gives_same_samples(hf_pair, sampled_run):
    _, config, params = hf_pair
    sampler = Sampler(config, params, SAMPLED, eos_id=None, pad_id=PAD_ID)
    first = np.asarray(sampled_run.tokens)
    again = np.asarray(generate(sampler, PROMPTS, seed=5).tokens)
    other = np.asarray(generate(sampler, PROMPTS, seed=6).tokens)
    np.testing.assert_array_equal(first, again)
    assert np.mean(first != other) > 0.5
    # The two samples of one prompt differ.
    assert np.mean(first[0] != first[1]) > 0.5


def test_num_samples_repeat_prompts(hf_pair, sampled_run):
    _, config, params = hf_pair
    tokens, mask = left_pad(PROMPTS, PAD_ID)
    np.testing.assert_array_equal(np.asarray(sampled_run.prompt_tokens),
                                  np.repeat(tokens, 2, axis=0))
    np.testing.assert_array_equal(np.asarray(sampled_run.prompt_mask), np.repeat(mask, 2, axis=0))
    assert sampled_run.tokens.shape == (8, MAX_NEW)
    np.testing.assert_array_equal(np.asarray(sampled_run.lengths), MAX_NEW)
    sampler = Sampler(config, params, SAMPLED, eos_id=None, pad_id=PAD_ID)
    samples = sampler.generate_ids(PROMPTS, jax.random.key(5))
    assert [len(per_prompt) for per_prompt in samples] == [2] * 4
    # Row b * num_samples + j is sample j of prompt b.
    assert samples[1][1] == np.asarray(sampled_run.tokens)[3].tolist()


def test_extra_stop_ids_end_sequences(hf_pair, free_run):
    _, config, params = hf_pair
    stop_id = int(free_run[2, 3])
    stopping = Sampler(config, params,
                       SamplingConfig(greedy=True, max_new_tokens=MAX_NEW, stop_ids=(stop_id,)),
                       eos_id=None, pad_id=PAD_ID)
    output = generate(stopping, PROMPTS)
    first_stop = int(np.flatnonzero(free_run[2] == stop_id)[0])
    assert int(output.lengths[2]) == first_stop + 1
    assert int(output.tokens[2, first_stop]) == stop_id
    assert np.all(np.asarray(output.tokens)[2, first_stop + 1:] == PAD_ID)


def test_one_bucket_compiles_once(hf_pair, caplog):
    _, config, params = hf_pair
    sampler = Sampler(config, params, SamplingConfig(max_new_tokens=6), eos_id=None,
                      prompt_buckets=(16, 32), new_token_buckets=(8, 16))
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.INFO, logger="llama_rlhf.sampling"):
        for length in range(3, 13):
            prompts = [rng.integers(3, 128, size=length).tolist(),
                       rng.integers(3, 128, size=length - 2).tolist()]
            generate(sampler, prompts, max_new_tokens=4 + length % 4)
    assert sampler.num_compilations == 1
    assert sum("Compiled the sampler" in message for message in caplog.messages) == 1
    # A prompt past the first bucket compiles a second program.
    generate(sampler, [list(range(3, 20)), list(range(3, 10))], max_new_tokens=4)
    assert sampler.num_compilations == 2


def test_new_params_do_not_recompile(hf_pair, free_run):
    _, config, params = hf_pair
    # The program for GREEDY is already compiled by free_run; samplers share it.
    sampler = Sampler(config, None, GREEDY, eos_id=None, pad_id=PAD_ID)
    np.testing.assert_array_equal(
        np.asarray(generate(sampler, PROMPTS, params=params).tokens), free_run)
    other = init_params(config, jax.random.key(1))
    after = np.asarray(generate(sampler, PROMPTS, params=other).tokens)
    assert np.mean(free_run != after) > 0.5
    getter = Sampler(config, lambda: params, GREEDY, eos_id=None, pad_id=PAD_ID)
    np.testing.assert_array_equal(np.asarray(generate(getter, PROMPTS).tokens), free_run)
    assert sampler.num_compilations == 0
    assert getter.num_compilations == 0


def test_mesh_matches_single_device(hf_pair, free_run, sampled_run):
    _, config, params = hf_pair
    mesh = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # 3 prompts, so the batch is padded to the 4 batch shards. Samples depend only on the seed,
    # the step and the row, so they equal the first rows of the 4-prompt single-device runs.
    prompts = PROMPTS[:3]
    greedy = generate(Sampler(config, params, GREEDY, eos_id=None, pad_id=PAD_ID, mesh=mesh),
                      prompts)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), free_run[:3])
    sampled = generate(Sampler(config, params, SAMPLED, eos_id=None, pad_id=PAD_ID, mesh=mesh),
                       prompts, seed=5)
    assert sampled.tokens.shape == (6, MAX_NEW)
    np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(sampled_run.tokens)[:6])
    # Sharded matrix products sum in another order, so allow float32 rounding.
    np.testing.assert_allclose(np.asarray(sampled.logprobs),
                               np.asarray(sampled_run.logprobs)[:6], atol=1e-4)


def test_generate_text_decodes_samples(shared):
    from llama_rlhf.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(shared / "models" / "llama2-tokenizer" / "tokenizer.model")
    config = get_variant("tiny")
    params = init_params(config, jax.random.key(0))
    sampler = Sampler(config, params, SamplingConfig(max_new_tokens=5, num_samples=2),
                      eos_id=tokenizer.eos_id)
    prompts = ["Hello there", "How are you?"]
    texts = sampler.generate_text(tokenizer, prompts, jax.random.key(0))
    ids = sampler.generate_ids([tokenizer.encode(p, bos=True) for p in prompts],
                               jax.random.key(0))
    assert [len(per_prompt) for per_prompt in texts] == [2, 2]
    for per_prompt_texts, per_prompt_ids in zip(texts, ids, strict=True):
        for text, sample in zip(per_prompt_texts, per_prompt_ids, strict=True):
            if sample and sample[-1] == tokenizer.eos_id:
                sample = sample[:-1]
            assert text == tokenizer.decode(sample)


def test_bucket_length():
    assert bucket_length(1, (16, 32)) == 16
    assert bucket_length(16, (16, 32)) == 16
    assert bucket_length(17, (16, 32)) == 32
    assert bucket_length(33, (16, 32)) == 64
    assert bucket_length(65, (16, 32)) == 96


def test_left_pad():
    tokens, mask = left_pad([[5, 6], [7]], pad_id=0, length=3)
    np.testing.assert_array_equal(tokens, [[0, 5, 6], [0, 0, 7]])
    np.testing.assert_array_equal(mask, [[False, True, True], [False, False, True]])
    with pytest.raises(ValueError, match="expected between 1 and length=3"):
        left_pad([[1, 2, 3, 4]], pad_id=0, length=3)


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.5, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("top_k", -1, "top_k"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("max_new_tokens", 0, "max_new_tokens"),
    ("num_samples", 0, "num_samples"),
])
def test_sampling_config_rejects_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**{field: value})


def test_generate_rejects_bad_prompts(hf_pair):
    _, config, params = hf_pair
    sampler = Sampler(config, params, GREEDY, eos_id=2)
    rng = jax.random.key(0)
    tokens = np.array([[0, 5, 6], [0, 0, 7]])
    mask = np.array([[False, True, True], [False, False, True]])
    with pytest.raises(ValueError, match="not left-padded"):
        sampler.generate(tokens, np.array([[True, True, False], [False, False, True]]), rng)
    with pytest.raises(ValueError, match="row 1 has no real tokens"):
        sampler.generate(tokens, np.array([[True, True, True], [False, False, False]]), rng)
    with pytest.raises(ValueError, match=r"prompt_tokens\[0, 2\] = 500 is outside"):
        sampler.generate(np.array([[0, 5, 500], [0, 0, 7]]), mask, rng)
    with pytest.raises(ValueError, match="prompt_mask has shape"):
        sampler.generate(tokens, mask[:, 1:], rng)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        sampler.generate(tokens, mask, rng, max_new_tokens=255)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        sampler.generate(tokens, mask, rng, max_new_tokens=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Sampler(config, params, SamplingConfig(stop_ids=(128,)), eos_id=2)
    with pytest.raises(ValueError, match="no parameters"):
        Sampler(config, None, SamplingConfig(), eos_id=2).generate(tokens, mask, rng)


def test_benchmark_small_run(capsys):
    from experiments import benchmark_sampling

    result = benchmark_sampling.main(["--small", "--pause", "0"])
    assert result["greedy_agreement"] == 1.0
    assert result["compilations"] == 1
    assert result["jax_tokens_per_s"] > 0 and result["hf_tokens_per_s"] > 0
    assert "speed-up" in capsys.readouterr().out
