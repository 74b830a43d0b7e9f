"""Times `llama_rlhf.sampling.Sampler` against Hugging Face transformers' `generate`.

Both generate greedily from the same random weights (a transformers `LlamaForCausalLM` built
with a fixed torch seed, saved, and loaded with `load_hf_checkpoint`), in float32, from the
same left-padded prompts, with a KV cache (transformers' default dynamic cache), for exactly
`--new-tokens` tokens per sequence (no EOS stop). Only generated tokens count. Warm-up runs are
excluded from the timings, and the sampler's compile time is reported on its own. torch gets
as many intra-op threads as the process may use cores; XLA's CPU client sizes its thread pool
from the same core count.

Full size (a 6-layer, 512-wide model, batch 16, prompt 64, 128 new tokens):

  python -m experiments.benchmark_sampling

A smoke run with a tiny model takes a few seconds:

  python -m experiments.benchmark_sampling --small

On a machine shared with other jobs, torch's OpenMP threads spin while they wait and lose much
of their speed when the cores are oversubscribed. `OMP_WAIT_POLICY=PASSIVE` makes them sleep
instead, the fairer setting there. Results and their conditions are recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from llama_rlhf.model import LlamaConfig, get_variant
from llama_rlhf.model.hf_checkpoint import config_to_hf, load_hf_checkpoint
from llama_rlhf.sampling import Sampler, SamplingConfig


def build_models(config: LlamaConfig, seed: int, workdir: str):
    """Builds a random transformers Llama and loads the same weights as this project's params.

    The transformers model is saved with `save_pretrained` under `workdir` and read back with
    `load_hf_checkpoint`, the project's own checkpoint import.
    """
    torch.manual_seed(seed)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(config)))
    hf_model.eval()
    hf_model.save_pretrained(workdir)
    loaded_config, params = load_hf_checkpoint(workdir)
    if loaded_config != config:
        raise RuntimeError(f"The checkpoint round trip changed the config: {loaded_config}.")
    return hf_model, params


def make_prompts(batch: int, prompt_length: int, vocab_size: int, seed: int):
    """Returns left-padded random prompts (tokens, mask) whose lengths vary up to prompt_length.

    Row i has prompt_length - (i % 4) * (prompt_length // 8) real tokens, so the batch mixes
    four lengths, and the longest row fills the whole width.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab_size, size=(batch, prompt_length), dtype=np.int64)
    mask = np.ones((batch, prompt_length), bool)
    for row in range(batch):
        padding = (row % 4) * (prompt_length // 8)
        mask[row, :padding] = False
        tokens[row, :padding] = 0
    return tokens, mask


def run_benchmark(config: LlamaConfig, batch: int, prompt_length: int, new_tokens: int,
                  repeats: int = 3, seed: int = 0, pause_seconds: float = 3.0
                  ) -> dict[str, float]:
    """Times both generators on the same weights and prompts.

    After one warm-up call each, the two generators run alternately `repeats` times, so a
    change in machine load during the run affects both, with `pause_seconds` of idle time
    before each call.

    Returns:
      A dict with tokens/s of each (median over the timed runs), their ratio, the sampler's
      compile time, the thread counts and the fraction of generated tokens on which the two
      greedy outputs agree.
    """
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as workdir:
        hf_model, params = build_models(config, seed, workdir)
    # No EOS stop, so both generate exactly new_tokens tokens for every sequence.
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    tokens, mask = make_prompts(batch, prompt_length, config.vocab_size, seed)
    input_ids = torch.from_numpy(tokens)
    attention_mask = torch.from_numpy(mask.astype(np.int64))
    sampler = Sampler(config, params, SamplingConfig(greedy=True, max_new_tokens=new_tokens),
                      eos_id=None, pad_id=0)
    rng = jax.random.key(seed)

    def run_jax():
        output = sampler.generate(tokens, mask, rng)
        return np.asarray(jax.block_until_ready(output.tokens))

    def run_hf():
        with torch.inference_mode():
            output = hf_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        return output[:, prompt_length:].numpy()

    def timed(fn):
        # Idle first: XLA's and torch's worker threads keep spinning for a moment after a call,
        # which would slow down whichever generator runs next on the same cores.
        time.sleep(pause_seconds)
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        return time.perf_counter() - start, time.process_time() - start_cpu, result

    first_call, _, jax_tokens = timed(run_jax)
    _, _, hf_tokens = timed(run_hf)
    if hf_tokens.shape != (batch, new_tokens) or jax_tokens.shape != (batch, new_tokens):
        raise RuntimeError(f"Expected {new_tokens} new tokens per sequence, got "
                           f"{hf_tokens.shape} (transformers) and {jax_tokens.shape} (sampler).")
    jax_times, hf_times, jax_cpu_times, hf_cpu_times = [], [], [], []
    for _ in range(repeats):
        seconds, cpu_seconds, _ = timed(run_jax)
        jax_times.append(seconds)
        jax_cpu_times.append(cpu_seconds)
        seconds, cpu_seconds, _ = timed(run_hf)
        hf_times.append(seconds)
        hf_cpu_times.append(cpu_seconds)

    generated_tokens = batch * new_tokens
    jax_seconds = statistics.median(jax_times)
    hf_seconds = statistics.median(hf_times)
    return {
        "jax_cpu_seconds": statistics.median(jax_cpu_times),
        "hf_cpu_seconds": statistics.median(hf_cpu_times),
        "jax_tokens_per_s": generated_tokens / jax_seconds,
        "hf_tokens_per_s": generated_tokens / hf_seconds,
        "speedup": hf_seconds / jax_seconds,
        "jax_seconds": jax_seconds,
        "hf_seconds": hf_seconds,
        "jax_compile_seconds": max(first_call - jax_seconds, 0.0),
        "torch_threads": torch.get_num_threads(),
        "cpu_cores": threads,
        "greedy_agreement": float(np.mean(hf_tokens == jax_tokens)),
        "first_token_agreement": float(np.mean(hf_tokens[:, 0] == jax_tokens[:, 0])),
        "compilations": sampler.num_compilations,
    }


def format_report(result: dict[str, float], config: LlamaConfig, batch: int, prompt_length: int,
                  new_tokens: int) -> str:
    """Formats the benchmark result as a small table."""
    lines = [
        f"model: {config.num_layers} layers, width {config.hidden_size}, "
        f"vocab {config.vocab_size}, float32; batch {batch}, prompt {prompt_length}, "
        f"{new_tokens} new tokens, greedy",
        f"threads: torch {result['torch_threads']}, cores available to XLA "
        f"{result['cpu_cores']}; jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "",
        "| generator | seconds per batch | tokens/s | CPU seconds per batch |",
        "|---|---|---|---|",
        f"| llama_rlhf Sampler | {result['jax_seconds']:.3f} | {result['jax_tokens_per_s']:.1f} "
        f"| {result['jax_cpu_seconds']:.3f} |",
        f"| transformers generate | {result['hf_seconds']:.3f} | "
        f"{result['hf_tokens_per_s']:.1f} | {result['hf_cpu_seconds']:.3f} |",
        "",
        f"speed-up (transformers time / sampler time): {result['speedup']:.2f}x; "
        f"CPU time ratio: {result['hf_cpu_seconds'] / result['jax_cpu_seconds']:.2f}x",
        f"sampler compile time (excluded above): {result['jax_compile_seconds']:.1f} s, "
        f"{result['compilations']} compilation(s)",
        f"greedy tokens equal between the two: {result['greedy_agreement']:.1%} "
        f"(first token: {result['first_token_agreement']:.1%})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true",
                        help="tiny model and sizes for a smoke run (overrides the size options)")
    parser.add_argument("--variant", default="tiny_6l_512",
                        help="model variant (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per batch")
    parser.add_argument("--prompt-length", type=int, default=64,
                        help="padded prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per generator; the median counts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")
    parser.add_argument("--pause", type=float, default=3.0,
                        help="idle seconds before each timed call (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.small:
        config = get_variant("tiny", vocab_size=512)
        batch, prompt_length, new_tokens, repeats = 4, 16, 8, 1
    else:
        config = get_variant(args.variant)
        batch, prompt_length, new_tokens, repeats = (
            args.batch, args.prompt_length, args.new_tokens, args.repeats)
    result = run_benchmark(config, batch, prompt_length, new_tokens, repeats, args.seed,
                           args.pause)
    print(format_report(result, config, batch, prompt_length, new_tokens))
    return result


if __name__ == "__main__":
    main()
