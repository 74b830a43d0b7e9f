"""The iterative RLHF loop: SFT, then RLHF versions V1 ... Vn, each built on the one before.

Llama 2-Chat (Touvron et al. 2023, arXiv:2307.09288, section 3.2) was not trained once. Each
week new preference comparisons were collected on answers of the latest models, the
helpfulness and safety reward models were retrained on everything collected so far, and a new
RLHF version was trained (rejection sampling; from V5 on also PPO; Ghost Attention from V3 on)
and evaluated. `RLHFLoop` ties the stage modules together in that order:

  sft/train            SFT on demonstrations (`sft.train_on_examples`)
  sft/eval             the SFT model's answers to the held-out prompts
  v<k>/comparisons     pairs of answers of the latest policy labelled by the simulated
                       annotator, or the version's share of a static pool of comparisons
  v<k>/reward_helpfulness, v<k>/reward_safety
                       `reward_model.train_on_comparisons` on the comparisons of versions
                       1..k, mixed per kind by `reward_model.mix_for_kind`
  v<k>/rejection_sampling
                       `rejection_sampling.run_rejection_sampling` on the latest policy,
                       pooling the selections of earlier versions
  v<k>/ppo             `ppo.run_ppo` on the rejection-sampling policy (from a configured
                       version on)
  v<k>/ghost_attention `ghost_attention.run_ghost_attention` on the newest policy (from a
                       configured version on)
  v<k>/eval            win rates against SFT and the previous version, gold scores, KL to SFT

Every stage has its own folder. A stage is finished when its `DONE` file exists: a JSON record
of its outputs and metrics, written atomically as the stage's last act. Rerunning skips
finished stages and calls the others again in the same folder, where they resume through their
own logic (training checkpoints, sample files written batch by batch). `config.json` is saved at
the first start; a rerun with a different config raises `ConfigMismatchError` naming the fields,
unless it is allowed, in which case the new values apply only to stages not yet finished.
`stages.jsonl` logs when each stage started, finished or was skipped. At the end the loop writes
`report.md` with its plots and prints a one-screen summary.

The simulated annotator labels two answers per prompt, sampled from the latest policy at the two
temperatures of `config.comparisons.temperatures`. A file annotator (HH-RLHF or the project's
JSONL) hands out its pool in one disjoint batch per version; the prompts of rejection sampling,
PPO and Ghost Attention are then the contexts of that version's comparisons.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from llama_rlhf import annotators, evaluation, sft
from llama_rlhf import ghost_attention as gatt
from llama_rlhf import rejection_sampling as rs
from llama_rlhf import sampling as sampling_lib
from llama_rlhf.data.chat import encode_for_training
from llama_rlhf.data.preferences import (
    Comparison,
    read_comparisons_jsonl,
    write_comparisons_jsonl,
)
from llama_rlhf.data.synthetic import SyntheticWorld, build_tokenizer
from llama_rlhf.data.tokenizer import Tokenizer, load_tokenizer
from llama_rlhf.ppo import Prompt, run_ppo
from llama_rlhf.reward_model import KINDS, mix_for_kind, split_held_out, train_on_comparisons
from llama_rlhf.training.checkpoints import initial_model_config, load_model
from llama_rlhf.training.metrics import save_config

logger = logging.getLogger(__name__)

DONE_FILE = "DONE"
STAGE_LOG_FILE = "stages.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
SAMPLES_DIR = "samples"
MANIFEST_FILE = "manifest.json"
TRAIN_COMPARISONS_FILE = "train.jsonl"
HELD_OUT_COMPARISONS_FILE = "held_out.jsonl"
ANSWERS_FILE = "answers.jsonl"
METRICS_FILE = "metrics.json"

# Policy stages of a version, in order; the last one that ran gives the version's policy.
POLICY_STAGES = ("rejection_sampling", "ppo", "ghost_attention")

# Streams of world prompts: seed = 1000 * stream + version, so each purpose and version draws
# its own prompts.
_STREAM_SFT = 1
_STREAM_COMPARISONS = 2
_STREAM_REJECTION_SAMPLING = 3
_STREAM_PPO_EVAL = 4
_STREAM_EVAL = 5
_STREAM_GATT = 6


class ConfigMismatchError(ValueError):
    """The config differs from the one the workdir was started with."""


class StopRequested(Exception):
    """Raised after the stage named by `stop_after` has finished, to stop a run there."""


# ---------------------------------------------------------------------------------------------
# Files.


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _config_json(config: ml_collections.ConfigDict) -> Any:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Returns the dotted names of the fields whose values differ between two JSON configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed = []
        for key in sorted(set(old) | set(new)):
            changed += config_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return changed
    return [] if old == new else [prefix.rstrip(".") or "(the whole config)"]


def check_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, *,
                 allow_change: bool) -> None:
    """Saves the config at the first start; afterwards checks that it is unchanged.

    Raises:
      ConfigMismatchError: `workdir/config.json` differs from `config` and `allow_change` is
        off; the message names the differing fields.
    """
    path = workdir / CONFIG_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = config_differences(saved, _config_json(config))
        if changed and not allow_change:
            raise ConfigMismatchError(
                f"The config differs from the one {workdir} was started with, in the fields "
                f"{', '.join(changed)}. Rerun with the original config to continue, use a new "
                "workdir, or allow the change (experiments.rlhf --allow_config_change), which "
                "applies the new values only to stages that have not finished.")
        if changed:
            logger.warning("Continuing %s with a changed config (fields %s); finished stages "
                           "keep their results.", workdir, ", ".join(changed))
    save_config(workdir, config)


def _manifest_check(directory: pathlib.Path, manifest: Mapping[str, Any]) -> None:
    """Writes the manifest of a folder of samples, or checks that the stored one matches."""
    path = directory / MANIFEST_FILE
    expected = json.loads(json.dumps(manifest))
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != expected:
            changed = config_differences(stored, expected)
            raise ValueError(f"The samples in {directory} were drawn with other settings "
                             f"({', '.join(changed)}); delete {directory} to sample again.")
        return
    rs.write_json_atomic(path, expected)


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


def _prompts_fingerprint(prompts: Sequence[Prompt]) -> str:
    return _fingerprint([[rs.prompt_key(p.dialog), p.is_safety_prompt] for p in prompts])


# ---------------------------------------------------------------------------------------------
# Stage bookkeeping.


class StageRunner:
    """Runs named stages once: a stage whose folder contains a `DONE` record is skipped.

    Args:
      workdir: the loop's folder; stage names are paths relative to it.
      stop_after: a stage name; `StopRequested` is raised once it has finished (or is found
        finished).
    """

    def __init__(self, workdir: pathlib.Path, stop_after: str | None = None):
        self.workdir = workdir
        self.stop_after = stop_after
        self.log_path = workdir / STAGE_LOG_FILE

    def _log(self, stage: str, event: str, **fields: Any) -> None:
        with self.log_path.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"time": _now(), "stage": stage, "event": event, **fields})
                       + "\n")

    def done_record(self, stage: str) -> dict[str, Any] | None:
        """Returns the DONE record of a finished stage, None for an unfinished one."""
        path = self.workdir / stage / DONE_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); delete it to run the stage "
                             "again.") from error

    def run(self, stage: str, body: Callable[[pathlib.Path], Mapping[str, Any]]
            ) -> dict[str, Any]:
        """Runs `body(stage folder)` unless the stage has finished; returns its DONE record.

        The record is {"stage", "finished", "seconds", "outputs"}, with `outputs` what `body`
        returned (JSON-ready: paths as strings).
        """
        record = self.done_record(stage)
        if record is not None:
            logger.info("Stage %s has finished before; skipping it.", stage)
            self._log(stage, "skipped")
        else:
            directory = self.workdir / stage
            directory.mkdir(parents=True, exist_ok=True)
            logger.info("Stage %s: starting in %s.", stage, directory)
            self._log(stage, "started")
            start = time.perf_counter()
            outputs = body(directory)
            seconds = time.perf_counter() - start
            record = {"stage": stage, "finished": _now(), "seconds": seconds,
                      "outputs": json.loads(json.dumps(outputs, default=str))}
            rs.write_json_atomic(directory / DONE_FILE, record)
            self._log(stage, "finished", seconds=seconds)
            logger.info("Stage %s finished in %.1f s.", stage, seconds)
        if self.stop_after == stage:
            raise StopRequested(f"Stopped after stage {stage}, as requested.")
        return record


# ---------------------------------------------------------------------------------------------
# Inputs: tokenizer, annotator, prompts.


def _unique_prompts(prompts: Sequence[Prompt], limit: int) -> list[Prompt]:
    """Drops repeated prompts (same messages) and keeps the first `limit` (0: all)."""
    seen, kept = set(), []
    for prompt in prompts:
        key = rs.prompt_key(prompt.dialog)
        if key not in seen:
            seen.add(key)
            kept.append(prompt)
    return kept[:limit] if limit else kept


def _context_prompts(comparisons: Sequence[Comparison], limit: int) -> list[Prompt]:
    """Returns the distinct contexts of comparisons as prompts, the first `limit` (0: all)."""
    return _unique_prompts([Prompt(tuple(c.context), c.is_safety_prompt) for c in comparisons],
                           limit)


@dataclasses.dataclass
class LoopInputs:
    """The inputs that every stage reads besides the models.

    Attributes:
      tokenizer: the tokenizer of every model of the loop.
      annotator: the source of each version's comparisons.
      world: the synthetic world, or None when the loop runs on real data.
      gold_scorer: the world's gold scorer, or None (no gold annotator).
      eval_prompts: the held-out prompts every policy answers in its eval stage.
    """

    tokenizer: Tokenizer
    annotator: annotators.Annotator
    world: SyntheticWorld | None
    gold_scorer: annotators.GoldScorer | None
    eval_prompts: list[Prompt]


def _world_prompts(world: SyntheticWorld, config: ml_collections.ConfigDict, count: int,
                   stream: int, version: int) -> list[Prompt]:
    prompts = world.prompts(count, safety_fraction=float(config.synthetic.safety_fraction),
                            seed=1000 * stream + version,
                            instruction_fraction=float(config.synthetic.instruction_fraction))
    return [rs.as_prompt(prompt) for prompt in prompts]


def file_version_comparisons(annotator: annotators.FileAnnotator, config: ml_collections.ConfigDict,
                             version: int) -> tuple[list[Comparison], list[Comparison]]:
    """Returns the (training, held-out) comparisons of a version (1-based) of a static pool.

    The split is a function of the config alone, so the held-out prompts of every version are
    known before the loop starts.
    """
    batch = annotator.batch_for_version(version - 1, int(config.num_versions))
    if config.comparisons.max_per_version:
        batch = batch[: int(config.comparisons.max_per_version)]
    return split_held_out(batch, float(config.comparisons.eval_fraction),
                          seed=int(config.seed) + version)


def prepare_inputs(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> LoopInputs:
    """Builds the tokenizer, the annotator and the held-out prompts of a loop config.

    With `config.synthetic.enabled`, the tokenizer is trained on the synthetic world (cached
    under `workdir/tokenizer`) and the held-out prompts are drawn from the world. Otherwise the
    tokenizer is `config.tokenizer`, and the contexts of a file annotator's held-out
    comparisons are the prompts.
    """
    workdir = pathlib.Path(workdir).absolute()
    world = gold_scorer = None
    if config.synthetic.enabled:
        world = SyntheticWorld(int(config.synthetic.world_seed), int(config.synthetic.num_animals))
        tokenizer = build_tokenizer(workdir, int(config.synthetic.vocab_size), world=world)
        gold_scorer = annotators.GoldScorer(world)
    else:
        if not config.tokenizer:
            raise ValueError("config.tokenizer is empty; set it to a tokenizer.model file or a "
                             "Hugging Face tokenizer folder, or turn on config.synthetic.enabled.")
        tokenizer = load_tokenizer(config.tokenizer)
    if config.annotator.kind == "simulated" and world is None:
        raise ValueError("The simulated annotator judges answers to the synthetic world's "
                         "prompts; turn on config.synthetic.enabled or use a file annotator.")
    annotator = annotators.make_annotator(config.annotator, world)

    num_eval = int(config.prompts.eval)
    if world is not None:
        eval_prompts = _world_prompts(world, config, num_eval, _STREAM_EVAL, 0)
    else:
        held_out = [comparison for version in range(1, int(config.num_versions) + 1)
                    for comparison in file_version_comparisons(annotator, config, version)[1]]
        eval_prompts = _context_prompts(held_out, 0)
    eval_prompts = _fitting_prompts(eval_prompts, tokenizer,
                                    int(config.prompts.max_prompt_length), "held-out")[:num_eval]
    return LoopInputs(tokenizer, annotator, world, gold_scorer, eval_prompts)


def _fitting_prompts(prompts: Sequence[Prompt], tokenizer: Tokenizer, max_length: int,
                     name: str) -> list[Prompt]:
    """Drops prompts longer than `max_length` tokens, counting them in a warning."""
    kept = [prompt for prompt in prompts if len(prompt.encode(tokenizer)) <= max_length]
    if len(kept) < len(prompts):
        logger.warning("Dropped %d of %d %s prompts longer than %d tokens.",
                       len(prompts) - len(kept), len(prompts), name, max_length)
    if not kept:
        raise ValueError(f"All {len(prompts)} {name} prompts are longer than "
                         f"prompts.max_prompt_length ({max_length} tokens).")
    return kept


# ---------------------------------------------------------------------------------------------
# Sampling answers in resumable batches.


@dataclasses.dataclass
class _PolicySampler:
    """Samples one answer per prompt from a policy, with its log-probabilities."""

    sampler: sampling_lib.Sampler
    params: Any
    prompt_length: int

    def sample(self, prompt_ids: Sequence[Sequence[int]], rng: jax.Array
               ) -> sampling_lib.SampleOutput:
        tokens, mask = sampling_lib.left_pad(prompt_ids, self.sampler.pad_id, self.prompt_length)
        return self.sampler.generate(tokens, mask, rng, params=self.params)


def _answer_records(output: sampling_lib.SampleOutput, tokenizer: Tokenizer, count: int
                    ) -> list[dict[str, Any]]:
    """Decodes the first `count` rows of a sampler output: text (without EOS), token ids (EOS
    included when generated), whether it ended with EOS."""
    tokens = np.asarray(output.tokens)
    lengths = np.asarray(output.lengths)
    records = []
    for row in range(count):
        ids = tokens[row, :lengths[row]].tolist()
        finished = bool(ids) and ids[-1] == tokenizer.eos_id
        text = tokenizer.decode(ids[:-1] if finished else ids).strip()
        records.append({"text": text, "ids": ids, "finished": finished})
    return records


def _batched(num_items: int, batch_size: int) -> list[list[int]]:
    return [list(range(start, min(start + batch_size, num_items)))
            for start in range(0, num_items, batch_size)]


def _run_batches(directory: pathlib.Path, num_items: int, batch_size: int,
                 sample_batch: Callable[[int, list[int]], list[dict[str, Any]]]
                 ) -> list[dict[str, Any]]:
    """Calls `sample_batch(index, item indices)` for every batch without a file, writes each
    result atomically to `directory/batch_<index>.json`, and returns all items in order."""
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    for index, items in enumerate(_batched(num_items, batch_size)):
        path = directory / f"batch_{index:06d}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("items") != items:
                raise ValueError(f"{path} contains other items than batch {index}; delete "
                                 f"{directory} to sample again.")
            results += record["results"]
            continue
        batch = sample_batch(index, items)
        rs.write_json_atomic(path, {"items": items, "results": batch})
        results += batch
    return results


# ---------------------------------------------------------------------------------------------
# The loop.


class RLHFLoop:
    """The stages of the iterative RLHF loop over one workdir (see the module docstring).

    Each stage method runs its stage unless it has finished and returns its DONE record; a
    method raises when a stage it depends on has not finished. `run` calls them all in order.

    Args:
      config: a `configs/rlhf.py` config.
      workdir: the loop's folder.
      allow_config_change: continue a workdir started with another config.
      stop_after: a stage name ("sft/train", "v2/ppo", ...) after which `StopRequested` is
        raised.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                 allow_config_change: bool = False, stop_after: str | None = None):
        _check_config(config)
        self.config = config
        self.workdir = pathlib.Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if stop_after is not None and stop_after not in self.stage_names():
            raise ValueError(f"stop_after is {stop_after!r}, expected one of the stages "
                             f"{self.stage_names()}.")
        check_config(self.workdir, config, allow_change=allow_config_change)
        self.runner = StageRunner(self.workdir, stop_after)
        self.inputs = prepare_inputs(config, self.workdir)
        self.mesh = sft.create_mesh_from_config(config)
        self._samplers: dict[float, sampling_lib.Sampler] = {}

    # --- Names and lookups. ---

    @property
    def num_versions(self) -> int:
        return int(self.config.num_versions)

    def version_stages(self, version: int) -> list[str]:
        """Returns the stages of a version (1-based), without the version prefix, in order."""
        return version_stages(self.config, version)

    def stage_names(self) -> list[str]:
        """Returns every stage of the loop, in the order `run` calls them."""
        return stage_names(self.config)

    def _require(self, stage: str) -> dict[str, Any]:
        record = self.runner.done_record(stage)
        if record is None:
            raise RuntimeError(f"Stage {stage} has not finished; run it first.")
        return record["outputs"]

    def _check_version(self, version: int) -> None:
        if not 1 <= version <= self.num_versions:
            raise ValueError(f"version is {version}, expected 1 to {self.num_versions}.")

    def policy_dir(self, version: int) -> str:
        """The policy of a version: the SFT model for 0, else the model of the version's last
        policy stage."""
        if version == 0:
            return self._require("sft/train")["model_dir"]
        self._check_version(version)
        last = [stage for stage in self.version_stages(version) if stage in POLICY_STAGES][-1]
        return self._require(f"v{version}/{last}")["model_dir"]

    def reward_model_dirs(self, version: int) -> dict[str, str]:
        return {kind: self._require(f"v{version}/reward_{kind}")["model_dir"] for kind in KINDS}

    # --- Prompts of a version. ---

    def _version_comparisons(self, version: int) -> tuple[list[Comparison], list[Comparison]]:
        outputs = self._require(f"v{version}/comparisons")
        return (read_comparisons_jsonl(outputs["train_file"]),
                read_comparisons_jsonl(outputs["held_out_file"]))

    def rejection_sampling_prompts(self, version: int) -> list[Prompt]:
        """Prompts of rejection sampling and PPO rollouts: fresh world prompts per version, or
        the contexts of the version's training comparisons."""
        count = int(self.config.prompts.rejection_sampling)
        world = self.inputs.world
        if world is not None and self.config.annotator.kind == "simulated":
            return _world_prompts(world, self.config, count, _STREAM_REJECTION_SAMPLING, version)
        return _context_prompts(self._version_comparisons(version)[0], count)

    def ppo_eval_prompts(self, version: int) -> list[Prompt]:
        """Prompts of PPO's held-out evaluation and early stopping."""
        count = int(self.config.prompts.ppo_eval)
        world = self.inputs.world
        if world is not None and self.config.annotator.kind == "simulated":
            return _world_prompts(world, self.config, count, _STREAM_PPO_EVAL, version)
        return _context_prompts(self._version_comparisons(version)[1], count)

    def gatt_dialogues(self, version: int) -> list[Any]:
        """Multi-turn dialogues whose user messages Ghost Attention answers anew."""
        synthetic = self.config.synthetic
        world = self.inputs.world
        if world is not None:
            return world.multi_turn_dialogues(
                int(synthetic.num_gatt_dialogues), int(synthetic.gatt_min_turns),
                int(synthetic.gatt_max_turns), seed=1000 * _STREAM_GATT + version)
        contexts = [prompt.dialog for prompt in self.rejection_sampling_prompts(version)]
        return contexts[: int(synthetic.num_gatt_dialogues)]

    # --- Models. ---

    def _sampler(self, temperature: float, max_new_tokens: int) -> sampling_lib.Sampler:
        """Returns a sampler of the policy shape; parameters are passed per call."""
        key = (float(temperature), int(max_new_tokens))
        if key not in self._samplers:
            model_config = initial_model_config(self.policy_dir(0))
            self._samplers[key] = sampling_lib.Sampler(
                model_config, None,
                sampling_lib.SamplingConfig(temperature=float(temperature),
                                            max_new_tokens=int(max_new_tokens)),
                self.inputs.tokenizer.eos_id, pad_id=self.inputs.tokenizer.pad_id,
                mesh=self.mesh)
        return self._samplers[key]

    def _load_policy(self, model_dir: str):
        return load_model(model_dir, mesh=self.mesh)

    # --- Stages. ---

    def sft(self) -> dict[str, Any]:
        """Stage sft/train: supervised fine-tuning of the initial policy."""

        def body(directory: pathlib.Path) -> dict[str, Any]:
            tokenizer = self.inputs.tokenizer
            config = copy.deepcopy(self.config.sft)
            if self.inputs.world is not None:
                config.data.tokenizer = str(tokenizer.source)
                examples, eval_examples = self._synthetic_sft_examples(), []
            else:
                examples, eval_examples = sft.load_data(config.data, tokenizer)
            logger.info("SFT on %d dialogues (%d held out).", len(examples), len(eval_examples))
            result = sft.train_on_examples(config, directory, examples, tokenizer=tokenizer,
                                           eval_examples=eval_examples or None,
                                           metadata={"stage": "rlhf_sft"})
            return {"model_dir": str(result.model_dir), "steps": result.steps,
                    "metrics": result.metrics, "examples": len(examples)}

        return self.runner.run("sft/train", body)

    def _synthetic_sft_examples(self) -> list[tuple[list[int], list[int]]]:
        """Demonstrations of mixed quality, plus multi-turn dialogues in which an instruction
        governs its own turn, encoded with their answers as targets."""
        synthetic, world = self.config.synthetic, self.inputs.world
        tokenizer = self.inputs.tokenizer
        demonstrations = world.sft_dialogues(
            int(synthetic.num_sft_dialogues), safety_fraction=float(synthetic.safety_fraction),
            seed=1000 * _STREAM_SFT, instruction_fraction=float(synthetic.instruction_fraction))
        examples = [encode_for_training(tokenizer, d.messages) for d in demonstrations]
        if synthetic.num_instruction_dialogues:
            space = gatt.InstructionSpace.from_config(self.config.ghost_attention.instructions)
            dialogues = gatt.instruction_sft_dialogues(
                world, space, num_dialogues=int(synthetic.num_instruction_dialogues),
                min_turns=1, max_turns=int(synthetic.instruction_max_turns),
                instruction_probability=float(synthetic.instruction_turn_probability),
                seed=1000 * _STREAM_SFT + 1)
            examples += [encode_for_training(tokenizer, messages) for messages in dialogues]
        order = np.random.default_rng(int(self.config.seed)).permutation(len(examples))
        return [examples[i] for i in order]

    def comparisons(self, version: int) -> dict[str, Any]:
        """Stage v<k>/comparisons: this version's new comparisons, split into a training and a
        held-out part."""
        self._check_version(version)

        def body(directory: pathlib.Path) -> dict[str, Any]:
            annotator = self.inputs.annotator
            if annotator.needs_samples:
                comparisons, summary = self._simulated_comparisons(version, directory)
                train, held_out = split_held_out(
                    comparisons, float(self.config.comparisons.eval_fraction),
                    seed=int(self.config.seed) + version)
            else:
                train, held_out = file_version_comparisons(annotator, self.config, version)
                summary = annotators.LabelingSummary(num_pairs=len(train) + len(held_out))
                for comparison in train + held_out:
                    summary.count(comparison)
            if not held_out:
                raise ValueError(f"Version {version} has no held-out comparison; raise "
                                 "prompts.comparisons or comparisons.eval_fraction.")
            write_comparisons_jsonl(directory / TRAIN_COMPARISONS_FILE, train)
            write_comparisons_jsonl(directory / HELD_OUT_COMPARISONS_FILE, held_out)
            counts = summary.to_metrics(prefix="")
            logger.info("Version %d: %d new comparisons (%d held out), %d on safety prompts, "
                        "levels %s.", version, len(train) + len(held_out), len(held_out),
                        summary.num_safety_prompts, summary.level_counts)
            return {"train_file": str(directory / TRAIN_COMPARISONS_FILE),
                    "held_out_file": str(directory / HELD_OUT_COMPARISONS_FILE),
                    "train": len(train), "held_out": len(held_out), "annotator": counts}

        return self.runner.run(f"v{version}/comparisons", body)

    def _simulated_comparisons(self, version: int, directory: pathlib.Path):
        """Samples two answers per prompt from the latest policy and labels the pairs."""
        settings = self.config.comparisons
        tokenizer = self.inputs.tokenizer
        policy_dir = self.policy_dir(version - 1)
        prompts = _fitting_prompts(
            _world_prompts(self.inputs.world, self.config, int(self.config.prompts.comparisons),
                           _STREAM_COMPARISONS, version),
            tokenizer, int(self.config.prompts.max_prompt_length), "comparison")
        temperatures = [float(t) for t in settings.temperatures]
        if len(temperatures) != 2:
            raise ValueError(f"comparisons.temperatures must hold two temperatures, got "
                             f"{settings.temperatures}.")
        samples_dir = directory / SAMPLES_DIR
        samples_dir.mkdir(parents=True, exist_ok=True)
        _manifest_check(samples_dir, {
            "policy": rs.model_identity(policy_dir), "prompts": _prompts_fingerprint(prompts),
            "temperatures": temperatures, "max_new_tokens": int(settings.max_new_tokens),
            "batch_size": int(settings.batch_size), "seed": int(self.config.seed)})
        encoded = [prompt.encode(tokenizer) for prompt in prompts]
        loaded: dict[str, Any] = {}
        base_rng = jax.random.fold_in(jax.random.key(int(self.config.seed)), version)

        def sample_batch(index: int, items: list[int]) -> list[dict[str, Any]]:
            if "params" not in loaded:
                loaded["params"] = self._load_policy(policy_dir).params
            batch = [encoded[i] for i in items]
            batch += [batch[0]] * (int(settings.batch_size) - len(batch))
            answers = []
            for slot, temperature in enumerate(temperatures):
                sampler = _PolicySampler(
                    self._sampler(temperature, int(settings.max_new_tokens)), loaded["params"],
                    int(self.config.prompts.max_prompt_length))
                output = sampler.sample(batch, jax.random.fold_in(base_rng, 2 * index + slot))
                answers.append(_answer_records(output, tokenizer, len(items)))
            return [{"a": first["text"], "b": second["text"]}
                    for first, second in zip(*answers, strict=True)]

        pairs = _run_batches(samples_dir, len(prompts), int(settings.batch_size), sample_batch)
        return self.inputs.annotator.annotate(
            version - 1, self.num_versions, prompts=[p.dialog for p in prompts],
            answers_a=[pair["a"] for pair in pairs], answers_b=[pair["b"] for pair in pairs])

    def reward_model(self, version: int, kind: str) -> dict[str, Any]:
        """Stage v<k>/reward_<kind>: a reward model trained on the comparisons of versions
        1..k (the held-out part of version k excluded) and evaluated on that held-out part."""
        self._check_version(version)
        if kind not in KINDS:
            raise ValueError(f"kind is {kind!r}, expected one of {KINDS}.")

        def body(directory: pathlib.Path) -> dict[str, Any]:
            pool: list[Comparison] = []
            for earlier in range(1, version + 1):
                train, held_out = self._version_comparisons(earlier)
                pool += train + (held_out if earlier < version else [])
            held_out = self._version_comparisons(version)[1]
            config = copy.deepcopy(self.config.reward_model)
            config.kind = kind
            config.data.tokenizer = str(self.inputs.tokenizer.source)
            data = config.data
            if data.mix:
                mixture = mix_for_kind(pool, kind, seed=int(config.seed) + version,
                                       other_per_own=float(data.other_per_own),
                                       safety_fraction=float(data.safety_fraction))
            else:
                mixture = list(pool)
            result = train_on_comparisons(config, directory, mixture, held_out,
                                          tokenizer=self.inputs.tokenizer,
                                          init_from=self._reward_model_init(version, kind))
            return {"model_dir": result["model_dir"], "eval": result["eval"],
                    "train_pairs": result["train_pairs"], "pool": len(pool),
                    "steps": result["steps"]}

        return self.runner.run(f"v{version}/reward_{kind}", body)

    def _reward_model_init(self, version: int, kind: str) -> str:
        init = self.config.reward_model_init
        if init == "sft":
            return self.policy_dir(0)
        if init == "previous" and version > 1:
            return self.reward_model_dirs(version - 1)[kind]
        return self.policy_dir(version - 1)

    def rejection_sampling(self, version: int) -> dict[str, Any]:
        """Stage v<k>/rejection_sampling: best-of-K answers of the latest policy, pooled with
        earlier versions' selections, fine-tune the latest policy (or the SFT model, with
        `rejection_sampling_init` "sft")."""
        self._check_version(version)

        def body(directory: pathlib.Path) -> dict[str, Any]:
            config = copy.deepcopy(self.config.rejection_sampling)
            config.iteration = version
            previous = [self._require(f"v{earlier}/rejection_sampling")["selected_file"]
                        for earlier in range(1, version)]
            latest = self.policy_dir(version - 1)
            init = self.policy_dir(0) if self.config.rejection_sampling_init == "sft" else latest
            summary = rs.run_rejection_sampling(
                config, directory, policy_init=init, sampling_policy=latest,
                reward_models=self.reward_model_dirs(version),
                prompts=self.rejection_sampling_prompts(version),
                tokenizer=self.inputs.tokenizer, previous_selections=previous)
            return {"model_dir": summary["model_dir"], "selected_file": summary["selected_file"],
                    "sampling": summary["sampling"], "selection": summary["selection"],
                    "best_of_n": summary["best_of_n"]}

        return self.runner.run(f"v{version}/rejection_sampling", body)

    def ppo(self, version: int) -> dict[str, Any]:
        """Stage v<k>/ppo: PPO on the rejection-sampling policy of the version."""
        self._check_version(version)
        if "ppo" not in self.version_stages(version):
            raise ValueError(f"Version {version} runs no PPO (ppo_from_version is "
                             f"{self.config.ppo_from_version}).")

        def body(directory: pathlib.Path) -> dict[str, Any]:
            gold = self.inputs.gold_scorer
            scorer = None if gold is None else (
                lambda prompts, texts: evaluation.gold_metrics(gold, prompts, texts))
            result = run_ppo(
                self.config.ppo, directory,
                policy_init=self._require(f"v{version}/rejection_sampling")["model_dir"],
                reward_models=self.reward_model_dirs(version),
                train_prompts=self.rejection_sampling_prompts(version),
                eval_prompts=self.ppo_eval_prompts(version), tokenizer=self.inputs.tokenizer,
                eval_scorer=scorer)
            return {key: result[key] for key in (
                "model_dir", "iterations", "stopped_early", "best_step", "initial_eval",
                "best_eval", "final_eval")}

        return self.runner.run(f"v{version}/ppo", body)

    def ghost_attention(self, version: int) -> dict[str, Any]:
        """Stage v<k>/ghost_attention: Ghost Attention on the version's newest policy."""
        self._check_version(version)
        stages = self.version_stages(version)
        if "ghost_attention" not in stages:
            raise ValueError(f"Version {version} runs no Ghost Attention "
                             f"(ghost_attention_from_version is "
                             f"{self.config.ghost_attention_from_version}).")
        source = "ppo" if "ppo" in stages else "rejection_sampling"

        def body(directory: pathlib.Path) -> dict[str, Any]:
            summary = gatt.run_ghost_attention(
                self.config.ghost_attention, directory,
                policy_init=self._require(f"v{version}/{source}")["model_dir"],
                tokenizer=self.inputs.tokenizer, dialogues=self.gatt_dialogues(version))
            return {"model_dir": summary["model_dir"], "data": summary["data"],
                    "finetune": summary["finetune"]}

        return self.runner.run(f"v{version}/ghost_attention", body)

    def evaluate(self, version: int) -> dict[str, Any]:
        """Stage sft/eval (version 0) or v<k>/eval: the policy's answers to the held-out
        prompts, their gold scores and KL to SFT, and (for k >= 1) the win rates against SFT
        and the previous version, judged by version k's reward models and the gold scorer."""
        stage = "sft/eval" if version == 0 else f"v{version}/eval"
        if version:
            self._check_version(version)

        def body(directory: pathlib.Path) -> dict[str, Any]:
            answers = self._eval_answers(version, directory)
            row = self._policy_metrics(version, answers)
            if version:
                row.update(self._version_judgements(version, answers))
            rs.write_json_atomic(directory / METRICS_FILE, row)
            return {"policy_dir": self.policy_dir(version),
                    "answers_file": str(directory / ANSWERS_FILE), "metrics": row}

        return self.runner.run(stage, body)

    def _eval_answers(self, version: int, directory: pathlib.Path) -> list[dict[str, Any]]:
        """Samples (resumably) the policy's answer to each held-out prompt with a fixed key,
        with the KL to SFT of each answer, and writes them to `answers.jsonl`."""
        settings = self.config.evaluation
        tokenizer = self.inputs.tokenizer
        prompts = self.inputs.eval_prompts
        policy_dir, sft_dir = self.policy_dir(version), self.policy_dir(0)
        samples_dir = directory / SAMPLES_DIR
        samples_dir.mkdir(parents=True, exist_ok=True)
        _manifest_check(samples_dir, {
            "policy": rs.model_identity(policy_dir), "reference": rs.model_identity(sft_dir),
            "prompts": _prompts_fingerprint(prompts), "settings": _config_json(settings)})
        encoded = [prompt.encode(tokenizer) for prompt in prompts]
        sampler = self._sampler(float(settings.temperature), int(settings.max_new_tokens))
        loaded: dict[str, Any] = {}
        rng = jax.random.key(int(settings.seed))

        def sample_batch(index: int, items: list[int]) -> list[dict[str, Any]]:
            if not loaded:
                loaded["policy"] = self._load_policy(policy_dir)
                loaded["sft"] = (loaded["policy"] if policy_dir == sft_dir
                                 else self._load_policy(sft_dir))
            batch = [encoded[i] for i in items]
            batch += [batch[0]] * (int(settings.batch_size) - len(batch))
            policy = _PolicySampler(sampler, loaded["policy"].params,
                                    int(self.config.prompts.max_prompt_length))
            # The key depends on the batch alone, so every policy answers with the same noise.
            output = policy.sample(batch, jax.random.fold_in(rng, index))
            reference = loaded["sft"]
            ref_logp = evaluation.reference_logprobs(reference.config, reference.params, output,
                                                     sampler.sampling)
            logp, mask = np.asarray(output.logprobs), np.asarray(output.response_mask)
            kl = {kind: evaluation.sequence_kl(logp, ref_logp, mask, kind)
                  for kind in ("k1", "k3")}
            records = _answer_records(output, tokenizer, len(items))
            for row, record in enumerate(records):
                record.update(prompt_index=items[row], kl_k1=float(kl["k1"][row]),
                              kl_k3=float(kl["k3"][row]))
            return records

        answers = _run_batches(samples_dir, len(prompts), int(settings.batch_size), sample_batch)
        if self.inputs.gold_scorer is not None:
            scores = self.inputs.gold_scorer.score_batch([p.dialog for p in prompts],
                                                         [a["text"] for a in answers])
            for index, answer in enumerate(answers):
                answer.update(gold=float(scores["gold"][index]),
                              gold_helpfulness=float(scores["helpfulness"][index]),
                              gold_safety=float(scores["safety"][index]),
                              gold_is_safe=bool(scores["is_safe"][index]))
        lines = [json.dumps(answer, ensure_ascii=False) for answer in answers]
        rs.write_text_atomic(directory / ANSWERS_FILE, "\n".join(lines) + "\n")
        return answers

    def _policy_metrics(self, version: int, answers: Sequence[Mapping[str, Any]]
                        ) -> dict[str, Any]:
        """Means over the held-out answers: gold scores, KL to SFT, length."""
        row: dict[str, Any] = {
            "version": version, "name": "SFT" if version == 0 else f"V{version}",
            "stages": ["sft"] if version == 0 else [
                s for s in self.version_stages(version) if s in POLICY_STAGES],
            "kl_to_sft": {kind: float(np.mean([a[f"kl_{kind}"] for a in answers]))
                          for kind in ("k1", "k3")},
            "answers": {"count": len(answers),
                        "length": float(np.mean([len(a["ids"]) for a in answers])),
                        "finished_fraction": float(np.mean([a["finished"] for a in answers]))},
            "gold": None,
        }
        if self.inputs.gold_scorer is not None:
            gold = np.array([a["gold"] for a in answers])
            on_safety = np.array([p.is_safety_prompt for p in self.inputs.eval_prompts])
            row["gold"] = {
                "gold": float(np.mean(gold)),
                "helpfulness_prompts": _mean_or_none(gold[~on_safety]),
                "safety_prompts": _mean_or_none(gold[on_safety]),
                "helpfulness": float(np.mean([a["gold_helpfulness"] for a in answers])),
                "safety": float(np.mean([a["gold_safety"] for a in answers])),
                "unsafe_fraction": float(np.mean([not a["gold_is_safe"] for a in answers])),
            }
        return row

    def _version_judgements(self, version: int, answers: Sequence[Mapping[str, Any]]
                            ) -> dict[str, Any]:
        """Reward-model scores and win rates of version k against SFT and version k - 1,
        the reward models' held-out accuracies, and the version's comparison counts."""
        prompts = self.inputs.eval_prompts
        tokenizer = self.inputs.tokenizer
        baselines = {"sft": self._stored_answers(0)}
        baselines["previous"] = (baselines["sft"] if version == 1
                                 else self._stored_answers(version - 1))
        scorer = rs.load_reward_scorer(self.reward_model_dirs(version), tokenizer,
                                       self.config.rejection_sampling, self.mesh)
        prompt_ids = [prompt.encode(tokenizer) for prompt in prompts]
        is_safety = [prompt.is_safety_prompt for prompt in prompts]

        def gated(answer_set):
            return scorer.score(prompt_ids, [a["ids"] for a in answer_set], is_safety)

        own = gated(answers)
        judgements: dict[str, Any] = {
            "reward": {"gated": float(np.mean(own["score"])),
                       "helpfulness": float(np.mean(own["helpfulness"])),
                       "safety": float(np.mean(own["safety"]))},
            "win_rates": {},
        }
        rm_judge = evaluation.score_judge(float(self.config.evaluation.reward_model_tie_margin))
        gold_judge = evaluation.score_judge(float(self.config.evaluation.gold_tie_margin))
        for name, baseline in baselines.items():
            rates = {"reward_model": evaluation.win_rate_both_orders(
                rm_judge, own["score"], gated(baseline)["score"]).to_json()}
            if self.inputs.gold_scorer is not None:
                rates["gold"] = evaluation.win_rate_both_orders(
                    gold_judge, [a["gold"] for a in answers],
                    [a["gold"] for a in baseline]).to_json()
            judgements["win_rates"][name] = rates

        judgements["reward_models"] = {}
        judgements["reward_model_pairs"] = {}
        for kind in KINDS:
            outputs = self._require(f"v{version}/reward_{kind}")
            judgements["reward_models"][kind] = outputs["eval"]
            judgements["reward_model_pairs"][kind] = outputs["train_pairs"]
        counts = self._require(f"v{version}/comparisons")
        annotator_counts = counts["annotator"]
        judgements["comparisons"] = {
            "new": counts["train"] + counts["held_out"], "held_out": counts["held_out"],
            "safety": int(annotator_counts["num_safety_prompts"]),
            "mean_gold_chosen": _finite(annotator_counts.get("mean_gold_chosen")),
            "mean_gold_rejected": _finite(annotator_counts.get("mean_gold_rejected")),
        }
        return judgements

    def _stored_answers(self, version: int) -> list[dict[str, Any]]:
        stage = "sft/eval" if version == 0 else f"v{version}/eval"
        path = self._require(stage)["answers_file"]
        with open(path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]

    # --- The whole loop. ---

    def run_version(self, version: int) -> dict[str, Any]:
        """Runs every stage of a version; returns its eval record."""
        self.comparisons(version)
        for kind in KINDS:
            self.reward_model(version, kind)
        self.rejection_sampling(version)
        stages = self.version_stages(version)
        if "ppo" in stages:
            self.ppo(version)
        if "ghost_attention" in stages:
            self.ghost_attention(version)
        return self.evaluate(version)

    def rows(self) -> list[dict[str, Any]]:
        """Returns the metrics of every evaluated policy, SFT first."""
        rows = []
        for version in range(self.num_versions + 1):
            stage = "sft/eval" if version == 0 else f"v{version}/eval"
            record = self.runner.done_record(stage)
            if record is not None:
                rows.append(record["outputs"]["metrics"])
        return rows

    def stage_seconds(self) -> dict[str, float]:
        """Returns the wall-clock seconds of each finished stage, from the DONE records."""
        seconds = {}
        for stage in self.stage_names():
            record = self.runner.done_record(stage)
            if record is not None:
                seconds[stage] = float(record["seconds"])
        return seconds

    def write_report(self) -> pathlib.Path:
        """Writes `report.md` and its plots into the workdir."""
        config = self.config
        annotator = config.annotator
        source = (f"simulated annotator (gold scorer of the synthetic world, noise "
                  f"{annotator.noise})" if annotator.kind == "simulated"
                  else f"file annotator ({annotator.format}: `{annotator.path}`)")
        description = "\n".join([
            f"Config variant `{config.variant}`, {self.num_versions} RLHF versions, "
            f"PPO from version {config.ppo_from_version or 'never'}, Ghost Attention from "
            f"version {config.ghost_attention_from_version or 'never'}; comparisons from the "
            f"{source}.",
            "",
            f"Every policy answers the same {len(self.inputs.eval_prompts)} held-out prompts "
            f"(temperature {config.evaluation.temperature:g}, at most "
            f"{config.evaluation.max_new_tokens} tokens, one fixed key). KL to SFT is the mean "
            "over answers of the summed per-token log-ratio log π - log π_SFT (k1)."])
        return evaluation.write_report(self.workdir, self.rows(),
                                       title="Iterative RLHF: SFT and versions V1 to "
                                             f"V{self.num_versions}",
                                       description=description,
                                       stage_seconds=self.stage_seconds())

    def run(self) -> dict[str, Any]:
        """Runs (or continues) the whole loop, writes the report and `summary.json`, and returns
        {"rows", "report", "summary"}."""
        start = time.perf_counter()
        self.sft()
        self.evaluate(0)
        for version in range(1, self.num_versions + 1):
            self.run_version(version)
        report = self.write_report()
        rows = self.rows()
        summary = evaluation.summary_text(rows)
        result = {"rows": rows, "report": str(report), "summary": summary,
                  "seconds_this_run": time.perf_counter() - start,
                  "stage_seconds": self.stage_seconds()}
        rs.write_json_atomic(self.workdir / SUMMARY_FILE, result)
        return result


def version_stages(config: ml_collections.ConfigDict, version: int) -> list[str]:
    """Returns the stages of a version (1-based) of a loop config, without the prefix."""
    stages = ["comparisons", *(f"reward_{kind}" for kind in KINDS), "rejection_sampling"]
    if config.ppo_from_version and version >= int(config.ppo_from_version):
        stages.append("ppo")
    if config.ghost_attention_from_version and version >= int(
            config.ghost_attention_from_version):
        stages.append("ghost_attention")
    return [*stages, "eval"]


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    """Returns every stage of a loop config, in the order `RLHFLoop.run` calls them."""
    names = ["sft/train", "sft/eval"]
    for version in range(1, int(config.num_versions) + 1):
        names += [f"v{version}/{stage}" for stage in version_stages(config, version)]
    return names


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the loop config field that has an invalid value."""
    if int(config.num_versions) < 1:
        raise ValueError(f"num_versions must be >= 1, got {config.num_versions}.")
    for name in ("ppo_from_version", "ghost_attention_from_version"):
        if int(config[name]) < 0:
            raise ValueError(f"{name} must be >= 0 (0: never), got {config[name]}.")
    if config.reward_model_init not in ("policy", "previous", "sft"):
        raise ValueError(f"reward_model_init must be 'policy', 'previous' or 'sft', got "
                         f"{config.reward_model_init!r}.")
    if config.rejection_sampling_init not in ("latest", "sft"):
        raise ValueError(f"rejection_sampling_init must be 'latest' or 'sft', got "
                         f"{config.rejection_sampling_init!r}.")
    for name in ("comparisons", "rejection_sampling", "ppo_eval", "eval", "max_prompt_length"):
        if int(config.prompts[name]) < 1:
            raise ValueError(f"prompts.{name} must be positive, got {config.prompts[name]}.")
    if not 0.0 < float(config.comparisons.eval_fraction) < 1.0:
        raise ValueError(f"comparisons.eval_fraction must be in (0, 1), got "
                         f"{config.comparisons.eval_fraction}.")


def run_rlhf(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
             allow_config_change: bool = False, stop_after: str | None = None
             ) -> dict[str, Any]:
    """Runs or continues the iterative RLHF loop of `config` in `workdir`; see `RLHFLoop.run`.

    Raises:
      StopRequested: after the stage `stop_after`, when given.
    """
    loop = RLHFLoop(config, workdir, allow_config_change=allow_config_change,
                    stop_after=stop_after)
    return loop.run()
