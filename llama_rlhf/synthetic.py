"""A self-contained tiny RLHF setup on the synthetic world, for CPU runs of the RLHF stages.

No real chat model exists at a size a CPU trains in minutes, so the tiny variants of PPO and
rejection sampling build their inputs here, in the same order as Llama 2-Chat's pipeline:

  1. A SentencePiece tokenizer trained on the world's language (`data.synthetic`).
  2. A policy: a randomly initialised tiny Llama fine-tuned with the SFT stage on
     demonstrations of mixed quality (ideal, partly wrong, rude, verbose answers; refusals
     and compliance for harmful requests), so that RLHF has room to improve it.
  3. Comparisons: two answers sampled from that policy per prompt, plus two world-written
     answers of random qualities, labelled by the simulated annotator (the gold scorer of
     `annotators`), 10% held out.
  4. Helpfulness and safety reward models, initialised from the policy with a fresh scalar
     head and trained with the reward-model stage on Llama 2's mixtures of the comparisons.
  5. Training and held-out prompts from the world, a quarter of them safety prompts.

Every step stores its result in the setup directory, and a finished setup is recorded in
`setup.json` together with the settings that built it, so a rerun with the same settings
loads it instead of training again.

The SFT and reward-model hyperparameters not in `config.synthetic` come from the stages' own
`tiny` configs (`configs/sft.py`, `configs/reward_model.py`), imported from the repository
root like the experiment scripts do.

NOTE: the world's request space is finite, so held-out prompts repeat training prompts (see
`data.synthetic`); held-out here means unseen sampled answers, not unseen requests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from llama_rlhf import annotators
from llama_rlhf import sampling as sampling_lib
from llama_rlhf.data import synthetic as world_lib
from llama_rlhf.data.chat import encode_for_training, encode_prompt
from llama_rlhf.data.preferences import read_comparisons_jsonl, write_comparisons_jsonl
from llama_rlhf.data.tokenizer import Tokenizer
from llama_rlhf.ppo import Prompt
from llama_rlhf.reward_model.mixing import mix_for_kind, split_held_out
from llama_rlhf.training.checkpoints import MODEL_FILE, load_model

logger = logging.getLogger(__name__)

SETUP_FILE = "setup.json"
# Settings of `config.synthetic` that change only the prompt lists, never the models.
_PROMPT_SETTINGS = ("enabled", "num_train_prompts", "num_eval_prompts")
# Demonstrations per SFT step, the SFT peak learning rate and sequence length.
SFT_BATCH_SIZE = 32
SFT_LEARNING_RATE = 1e-3
MAX_LENGTH = 96
# Longest answer sampled for the comparisons, in tokens.
MAX_ANSWER_TOKENS = 64
# Share of safety prompts among all prompts, and of comparisons held out.
SAFETY_FRACTION = 0.25
HELD_OUT_FRACTION = 0.1
# Seeds of the world's sampling streams, one per use, so that the prompt sets are disjoint
# draws.
_SEED_DEMONSTRATIONS = 1
_SEED_COMPARISON_PROMPTS = 2
_SEED_TRAIN_PROMPTS = 3
_SEED_EVAL_PROMPTS = 4


@dataclasses.dataclass
class SyntheticSetup:
    """The inputs of an RLHF stage, built by `build_synthetic_setup`.

    Attributes:
      world: the synthetic world.
      tokenizer: its tokenizer.
      policy_dir: the SFT policy (a `save_model` folder, head "lm").
      helpfulness_dir, safety_dir: the reward models (head "scalar", with score statistics).
      train_prompts, eval_prompts: prompts for rollouts and for held-out evaluation.
      gold_scorer: the simulated annotator's judge, for measuring true answer quality.
    """

    world: world_lib.SyntheticWorld
    tokenizer: Tokenizer
    policy_dir: pathlib.Path
    helpfulness_dir: pathlib.Path
    safety_dir: pathlib.Path
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    gold_scorer: annotators.GoldScorer

    def gold_metrics(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> dict[str, float]:
        """Mean gold scores of answers (the gated score and its two parts) and the unsafe share."""
        scores = self.gold_scorer.score_batch([p.dialog for p in prompts], list(answers))
        return {
            "gold": float(np.mean(scores["gold"])),
            "gold_helpfulness": float(np.mean(scores["helpfulness"])),
            "gold_safety": float(np.mean(scores["safety"])),
            "unsafe_fraction": float(np.mean(~scores["is_safe"])),
        }


def _prompts(world: world_lib.SyntheticWorld, n: int, seed: int) -> list[Prompt]:
    return [Prompt(p.messages, p.is_safety_prompt)
            for p in world.prompts(n, safety_fraction=SAFETY_FRACTION, seed=seed)]


def _model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {"vocab_size": int(config.vocab_size), **dict(config.model)}


def _train_policy(config, directory: pathlib.Path, world, tokenizer, seed: int) -> pathlib.Path:
    """Fine-tunes a random tiny Llama on demonstrations; returns its export folder."""
    from configs import sft as sft_configs  # The SFT stage's tiny settings.
    from llama_rlhf import sft

    sft_config = sft_configs.get_config("tiny")
    sft_config.seed = seed
    sft_config.init_from = "random:tiny"
    sft_config.model_overrides = ml_collections.ConfigDict(_model_overrides(config))
    sft_config.data.max_length = MAX_LENGTH
    sft_config.batch_size = SFT_BATCH_SIZE
    sft_config.num_steps = int(config.policy_sft_steps)
    sft_config.optimizer.learning_rate = SFT_LEARNING_RATE
    sft_config.num_devices = 1
    sft_config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    sft_config.loop.log_every = 50
    sft_config.loop.eval_every = 0
    sft_config.loop.checkpoint_every = max(int(config.policy_sft_steps), 1)

    demonstrations = world.sft_dialogues(
        SFT_BATCH_SIZE * int(config.policy_sft_steps), safety_fraction=SAFETY_FRACTION,
        seed=_SEED_DEMONSTRATIONS, instruction_fraction=0.0,
    )
    examples = [encode_for_training(tokenizer, d.messages) for d in demonstrations]
    result = sft.train_on_examples(sft_config, directory / "sft", examples,
                                   tokenizer=tokenizer, metadata={"synthetic_seed": seed})
    return pathlib.Path(result.model_dir)


def _save_random_policy(config, directory: pathlib.Path, seed: int) -> pathlib.Path:
    """Exports a randomly initialised tiny policy (when `policy_sft_steps` is 0)."""
    from llama_rlhf.model import get_variant, init_params
    from llama_rlhf.training.checkpoints import save_model

    model_config = get_variant("tiny", **_model_overrides(config))
    params = init_params(model_config, jax.random.key(seed), "lm")
    return save_model(directory / "random_policy", model_config, params, head="lm",
                      metadata={"stage": "random", "synthetic_seed": seed})


def _sample_comparisons(config, directory: pathlib.Path, world, tokenizer, policy_dir,
                        seed: int) -> pathlib.Path:
    """Labels pairs of policy samples and of world answers; returns the JSONL file."""
    path = directory / "comparisons.jsonl"
    if path.is_file():
        return path
    num_prompts = max(int(config.num_comparisons) // 2, 1)
    prompts = world.prompts(num_prompts, safety_fraction=SAFETY_FRACTION,
                            seed=_SEED_COMPARISON_PROMPTS)

    # Two policy samples per prompt.
    policy = load_model(policy_dir)
    sampler = sampling_lib.Sampler(
        policy.config, policy.params,
        sampling_lib.SamplingConfig(temperature=1.0, max_new_tokens=MAX_ANSWER_TOKENS,
                                    num_samples=2),
        tokenizer.eos_id, pad_id=tokenizer.pad_id,
    )
    encoded = [encode_prompt(tokenizer, p.messages) for p in prompts]
    samples = []
    for start in range(0, len(encoded), 64):
        rng = jax.random.fold_in(jax.random.key(seed), start)
        for pair in sampler.generate_ids(encoded[start:start + 64], rng):
            samples.append([tokenizer.decode([i for i in ids if i != tokenizer.eos_id])
                            for ids in pair])

    # Two world-written answers of independently drawn qualities per prompt.
    rng = np.random.default_rng([seed, _SEED_COMPARISON_PROMPTS])
    written = []
    for prompt in prompts:
        qualities = world_lib.SAFETY_QUALITIES if prompt.is_safety_prompt else (
            world_lib.HELPFUL_QUALITIES)
        names = list(qualities)
        pair = [world.answer(prompt.request, names[rng.integers(len(names))], rng)
                for _ in range(2)]
        written.append(pair)

    annotator = annotators.SimulatedAnnotator(annotators.GoldScorer(world), seed=seed)
    comparisons, summary = annotator.label_pairs(
        [p for p in prompts for _ in range(2)],
        [pair[0] for s, w in zip(samples, written, strict=True) for pair in (s, w)],
        [pair[1] for s, w in zip(samples, written, strict=True) for pair in (s, w)],
    )
    logger.info("Labelled %d synthetic comparisons: %s", len(comparisons), summary.to_metrics())
    write_comparisons_jsonl(path, comparisons)
    return path


def _train_reward_model(config, directory: pathlib.Path, kind: str, train, held_out,
                        tokenizer, policy_dir, seed: int) -> pathlib.Path:
    """Trains the `kind` reward model from the policy; returns its export folder."""
    from configs import reward_model as reward_model_configs  # The stage's tiny settings.
    from llama_rlhf.reward_model import trainer

    rm_config = reward_model_configs.get_config("tiny")
    rm_config.kind = kind
    rm_config.seed = seed
    rm_config.model_overrides = ml_collections.ConfigDict()
    rm_config.data.max_length = MAX_LENGTH
    rm_config.optimizer.learning_rate = float(config.reward_model_learning_rate)
    mixture = mix_for_kind(train, kind, seed=seed)
    if not mixture:
        raise ValueError(f"No comparisons for the {kind} reward model; raise num_comparisons.")
    # Tiny smoke settings can label fewer pairs than one batch.
    rm_config.batch_size = min(int(config.reward_model_batch_size), len(mixture))
    rm_config.num_epochs = max(1, math.ceil(
        int(config.reward_model_steps) * rm_config.batch_size / len(mixture)))
    rm_config.loop.log_every = 50
    rm_config.loop.eval_every = 0
    rm_config.loop.checkpoint_every = 1000
    result = trainer.train_on_comparisons(rm_config, directory / f"{kind}_rm", mixture, held_out,
                                          tokenizer=tokenizer, init_from=str(policy_dir))
    logger.info("The synthetic %s reward model ranks %.1f%% of held-out pairs correctly.",
                kind, 100.0 * result["eval"].get("accuracy", math.nan))
    return pathlib.Path(result["model_dir"])


def _settings(config: ml_collections.ConfigDict, seed: int) -> dict[str, Any]:
    """Returns everything that decides the built setup, to detect a stale one."""
    settings = json.loads(config.to_json_best_effort())
    settings.update(
        seed=seed, sft_batch_size=SFT_BATCH_SIZE, sft_learning_rate=SFT_LEARNING_RATE,
        max_length=MAX_LENGTH, max_answer_tokens=MAX_ANSWER_TOKENS,
        safety_fraction=SAFETY_FRACTION, held_out_fraction=HELD_OUT_FRACTION,
    )
    return settings


def _model_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Drops the settings that only decide which prompts are drawn, not the built models, so
    that stages with different prompt counts share one setup."""
    return {name: value for name, value in settings.items() if name not in _PROMPT_SETTINGS}


def build_synthetic_setup(
    config: ml_collections.ConfigDict, directory: str | os.PathLike, *, seed: int = 0
) -> SyntheticSetup:
    """Builds (or loads) the tokenizer, policy, reward models and prompts of a tiny run.

    Args:
      config: the `synthetic` section of a stage config: vocab_size, model (LlamaConfig fields
        of the tiny models), num_train_prompts, num_eval_prompts, num_comparisons (labelled
        pairs to draw), reward_model_steps, reward_model_batch_size,
        reward_model_learning_rate and policy_sft_steps (0 keeps the policy random).
      directory: where the setup is stored (the stage's `workdir/setup`).
      seed: seed of the world, the models and the sampling.

    Returns:
      The setup. Its prompts are regenerated from the world, which is cheap.
    """
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    world = world_lib.SyntheticWorld(seed=seed)
    tokenizer = world_lib.build_tokenizer(directory, vocab_size=int(config.vocab_size),
                                          world=world)
    settings = _settings(config, seed)
    record_path = directory / SETUP_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record is not None and _model_settings(record.get("settings", {})) != _model_settings(
        settings
    ):
        raise ValueError(
            f"{record_path} was built with other settings ({record.get('settings')}); use a new "
            "workdir or delete the setup folder."
        )

    if record is None:
        if int(config.policy_sft_steps) > 0:
            policy_dir = _train_policy(config, directory, world, tokenizer, seed)
        else:
            policy_dir = _save_random_policy(config, directory, seed)
        comparisons_path = _sample_comparisons(config, directory, world, tokenizer, policy_dir,
                                               seed)
        comparisons = read_comparisons_jsonl(comparisons_path)
        train, held_out = split_held_out(comparisons, HELD_OUT_FRACTION, seed=seed)
        reward_dirs = {
            kind: _train_reward_model(config, directory, kind, train, held_out, tokenizer,
                                      policy_dir, seed)
            for kind in ("helpfulness", "safety")
        }
        # Paths relative to the setup folder, so that a moved workdir still loads.
        record = {
            "settings": settings,
            "policy_dir": str(policy_dir.relative_to(directory)),
            "helpfulness_dir": str(reward_dirs["helpfulness"].relative_to(directory)),
            "safety_dir": str(reward_dirs["safety"].relative_to(directory)),
            "num_comparisons": len(comparisons),
        }
        temporary = record_path.with_name(f".{SETUP_FILE}.tmp")
        temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, record_path)

    paths = {name: directory / record[name]
             for name in ("policy_dir", "helpfulness_dir", "safety_dir")}
    for name, path in paths.items():
        if not (path / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{record_path} names {path} as {name}, but no exported model "
                                    "is found there; delete the setup folder to rebuild it.")
    return SyntheticSetup(
        world=world,
        tokenizer=tokenizer,
        policy_dir=paths["policy_dir"],
        helpfulness_dir=paths["helpfulness_dir"],
        safety_dir=paths["safety_dir"],
        train_prompts=_prompts(world, int(config.num_train_prompts), _SEED_TRAIN_PROMPTS),
        eval_prompts=_prompts(world, int(config.num_eval_prompts), _SEED_EVAL_PROMPTS),
        gold_scorer=annotators.GoldScorer(world),
    )
