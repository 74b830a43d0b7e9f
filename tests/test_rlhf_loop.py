"""Tests of the iterative RLHF loop (llama_rlhf/rlhf_loop.py) and its evaluation.

The win-rate, KL and report tests use hand-made inputs whose expected values are stated in the
comments or computed by plain numpy loops kept here. The run tests start
`python -m experiments.rlhf` on the `smoke` option of the configs in a subprocess with one CPU
device, because the test process has 8 fake ones and compiling the stages for 8 devices takes
minutes. One JAX compilation cache serves every run of the session.
"""

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import rlhf as rlhf_configs
from llama_rlhf import evaluation, rlhf_loop
from llama_rlhf.data.preferences import read_comparisons_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Win rates and KL.


def test_preferences_from_scores_with_margin():
    # Gaps 0.5, -0.5, 0.05, -0.05, 0: with a margin of 0.1 only the first two are decided.
    first = [1.0, 0.0, 0.55, 0.5, 0.3]
    second = [0.5, 0.5, 0.5, 0.55, 0.3]
    assert evaluation.preferences_from_scores(first, second, 0.1).tolist() == [1, -1, 0, 0, 0]
    assert evaluation.preferences_from_scores(first, second).tolist() == [1, -1, 1, -1, 0]


def test_preferences_reject_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        evaluation.preferences_from_scores([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        evaluation.preferences_from_scores([np.nan], [1.0])
    with pytest.raises(ValueError, match="tie_margin"):
        evaluation.preferences_from_scores([1.0], [1.0], -0.1)


def test_win_rate_of_score_judge():
    # A scores higher on prompts 0 and 1, lower on 2, equal on 3: 2 wins, 1 loss, 1 tie.
    judge = evaluation.score_judge()
    result = evaluation.win_rate_both_orders(judge, [0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.7, 0.5])
    assert (result.wins, result.losses, result.ties) == (2, 1, 1)
    assert result.win_rate == pytest.approx(2 / 3)
    assert result.tie_fraction == pytest.approx(1 / 4)
    assert evaluation.WinRate.from_json(result.to_json()) == result


def test_position_biased_judge_gives_ties():
    # A judge that always prefers the first answer it sees agrees with neither order's
    # reversal, so every pair is a tie and the win rate is undefined.
    def first_wins(first, second):
        return np.ones(len(first), np.int8)

    result = evaluation.win_rate_both_orders(first_wins, ["a", "b", "c"], ["x", "y", "z"])
    assert (result.wins, result.losses, result.ties) == (0, 0, 3)
    assert np.isnan(result.win_rate)
    assert result.to_json()["win_rate"] is None


def test_win_rate_needs_one_answer_per_prompt():
    with pytest.raises(ValueError, match="one answer of each policy per prompt"):
        evaluation.win_rate_both_orders(evaluation.score_judge(), [1.0, 2.0], [1.0])


def test_sequence_kl_matches_numpy_loop():
    rng = np.random.default_rng(0)
    logp = -rng.random((3, 5))
    ref_logp = -rng.random((3, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    for kind in ("k1", "k3"):
        expected = np.zeros(3)
        for b in range(3):
            for t in range(5):
                if mask[b, t]:
                    log_ratio = ref_logp[b, t] - logp[b, t]
                    expected[b] += (-log_ratio if kind == "k1"
                                    else np.exp(log_ratio) - 1 - log_ratio)
        np.testing.assert_allclose(evaluation.sequence_kl(logp, ref_logp, mask, kind), expected,
                                   rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Report.


def report_rows():
    win = evaluation.WinRate(6, 2, 0).to_json()
    lose = evaluation.WinRate(1, 3, 4).to_json()
    accuracy = {"pairs": 8, "ties": 0, "accuracy": 0.75, "per_level": {
        name: {"pairs": 2, "correct": 1, "accuracy": 0.5} for name in (
            "significantly_better", "better", "slightly_better", "negligibly_better")} | {
        "unknown": {"pairs": 0, "correct": 0, "accuracy": None}}}
    return [
        {"name": "SFT", "stages": ["sft"],
         "gold": {"gold": 0.41, "helpfulness_prompts": 0.5, "safety_prompts": 0.8,
                  "unsafe_fraction": 0.125},
         "kl_to_sft": {"k1": 0.0, "k3": 0.0}, "answers": {"length": 12.5,
                                                          "finished_fraction": 0.9}},
        {"name": "V1", "stages": ["rejection_sampling"],
         "gold": {"gold": 0.57, "helpfulness_prompts": 0.6, "safety_prompts": 0.9,
                  "unsafe_fraction": 0.0625},
         "reward": {"gated": 0.61}, "kl_to_sft": {"k1": 2.5, "k3": 1.0},
         "answers": {"length": 11.0, "finished_fraction": 1.0},
         "win_rates": {"sft": {"reward_model": win, "gold": win},
                       "previous": {"reward_model": lose, "gold": lose}},
         "comparisons": {"new": 40, "held_out": 4, "safety": 10, "mean_gold_chosen": 0.6,
                         "mean_gold_rejected": 0.3},
         "reward_model_pairs": {"helpfulness": 36, "safety": 12},
         "reward_models": {"helpfulness": accuracy, "safety": accuracy}},
    ]


def test_report_has_tables_and_plots(tmp_path):
    rows = report_rows()
    path = evaluation.write_report(tmp_path, rows, title="Test run", description="Settings.",
                                   stage_seconds={"sft/train": 1.5, "v1/eval": 2.0})
    text = path.read_text()
    # Win-rate cells: 6 / (6 + 2) = 75.0%, and 1 / (1 + 3) = 25.0% with 4 ties.
    assert "| V1 | 75.0% (6/2/0) | 75.0% (6/2/0) | 25.0% (1/3/4) | 25.0% (1/3/4) |" in text
    assert "| SFT | sft | 0.410 | 0.500 | 0.800 | 12.5% |" in text
    assert "| V1 helpfulness: accuracy (%) | 50.0 | 50.0 | 50.0 | 50.0 | – | 75.0 |" in text
    assert "| all | 3.5 |" in text
    for name in (evaluation.GOLD_PLOT_FILE, evaluation.WIN_RATE_PLOT_FILE,
                 evaluation.KL_PLOT_FILE):
        assert f"]({name})" in text
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"

    summary = evaluation.summary_text(rows).splitlines()
    assert len(summary) == 4
    assert summary[3].split() == ["V1", "0.570", "6.2%", "75.0%", "75.0%", "25.0%", "25.0%",
                                  "2.50"]


def test_report_without_gold_skips_gold_plot(tmp_path):
    rows = report_rows()
    for row in rows:
        row["gold"] = None
        row.get("win_rates", {}).get("sft", {}).pop("gold", None)
    text = evaluation.write_report(tmp_path, rows, title="t", description="d").read_text()
    assert evaluation.GOLD_PLOT_FILE not in text
    assert not (tmp_path / evaluation.GOLD_PLOT_FILE).exists()
    assert "| V1 | 75.0% (6/2/0) | – |" in text


# ---------------------------------------------------------------------------------------------
# Config and bookkeeping.


def test_config_variants():
    tiny = rlhf_configs.get_config("tiny")
    assert tiny.synthetic.enabled and tiny.annotator.kind == "simulated"
    assert (tiny.num_versions, tiny.ppo_from_version, tiny.ghost_attention_from_version) == (
        3, 3, 2)
    hh = rlhf_configs.get_config("hh_rlhf")
    assert not hh.synthetic.enabled
    assert hh.annotator.kind == "file"
    assert hh.annotator.path.endswith("harmless-base-2000.jsonl.gz")
    smoke = rlhf_configs.get_config("tiny,smoke")
    assert smoke.num_versions == 2
    assert smoke.sft.num_steps < tiny.sft.num_steps
    with pytest.raises(ValueError, match="Unknown RLHF loop variant"):
        rlhf_configs.get_config("7b")
    with pytest.raises(ValueError, match="only option is 'smoke'"):
        rlhf_configs.get_config("tiny,fast")
    with pytest.raises(AttributeError):
        tiny.num_version = 2  # A typo in a field name is an error, not a new field.


def test_stage_names_follow_config(tmp_path):
    config = rlhf_configs.get_config("tiny")
    loop = rlhf_loop.RLHFLoop(config, tmp_path)
    assert loop.version_stages(1) == ["comparisons", "reward_helpfulness", "reward_safety",
                                      "rejection_sampling", "eval"]
    assert loop.version_stages(2)[-2:] == ["ghost_attention", "eval"]
    assert loop.version_stages(3)[-3:] == ["ppo", "ghost_attention", "eval"]
    names = loop.stage_names()
    assert names[:3] == ["sft/train", "sft/eval", "v1/comparisons"]
    assert names[-1] == "v3/eval"
    assert len(names) == 2 + 5 + 6 + 7
    with pytest.raises(RuntimeError, match="Stage sft/train has not finished"):
        loop.policy_dir(0)
    with pytest.raises(RuntimeError, match="Stage v1/rejection_sampling has not finished"):
        loop.policy_dir(1)
    with pytest.raises(ValueError, match="version is 4"):
        loop.comparisons(4)


def test_config_change_is_rejected(tmp_path):
    rlhf_loop.check_config(tmp_path, rlhf_configs.get_config("tiny"), allow_change=False)
    changed = rlhf_configs.get_config("tiny")
    changed.num_versions = 4
    changed.rejection_sampling.sampling.num_samples = 3
    with pytest.raises(rlhf_loop.ConfigMismatchError,
                       match=r"num_versions, rejection_sampling.sampling.num_samples\."):
        rlhf_loop.check_config(tmp_path, changed, allow_change=False)
    rlhf_loop.check_config(tmp_path, changed, allow_change=True)
    assert json.loads((tmp_path / "config.json").read_text())["num_versions"] == 4


def test_stop_after_must_name_a_stage(tmp_path):
    with pytest.raises(ValueError, match="stop_after is 'v9/eval'"):
        rlhf_loop.RLHFLoop(rlhf_configs.get_config("tiny"), tmp_path, stop_after="v9/eval")


def test_bad_config_values_are_named(tmp_path):
    config = rlhf_configs.get_config("tiny")
    config.reward_model_init = "latest"
    with pytest.raises(ValueError, match="reward_model_init must be"):
        rlhf_loop.RLHFLoop(config, tmp_path)
    config = rlhf_configs.get_config("tiny")
    config.comparisons.eval_fraction = 0.0
    with pytest.raises(ValueError, match=r"comparisons.eval_fraction must be in \(0, 1\)"):
        rlhf_loop.RLHFLoop(config, tmp_path)


def test_stage_runner_runs_once(tmp_path):
    calls = []

    def body(directory):
        calls.append(directory)
        return {"value": 1, "path": directory / "x"}

    runner = rlhf_loop.StageRunner(tmp_path, stop_after="b/c")
    first = runner.run("a", body)
    assert first["outputs"] == {"value": 1, "path": str(tmp_path / "a" / "x")}
    assert runner.run("a", body) == first
    assert calls == [tmp_path / "a"]
    with pytest.raises(rlhf_loop.StopRequested, match="after stage b/c"):
        runner.run("b/c", body)
    events = [json.loads(line) for line in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["event"]) for e in events] == [
        ("a", "started"), ("a", "finished"), ("a", "skipped"), ("b/c", "started"),
        ("b/c", "finished")]


def test_batches_resume_where_they_stopped(tmp_path):
    calls = []

    def sample(index, items):
        calls.append(index)
        if index == 2 and len(calls) == 3:
            raise KeyboardInterrupt  # A crash while the third batch is sampled.
        return [{"item": i} for i in items]

    with pytest.raises(KeyboardInterrupt):
        rlhf_loop._run_batches(tmp_path, 7, 3, sample)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch_000000.json",
                                                          "batch_000001.json"]
    results = rlhf_loop._run_batches(tmp_path, 7, 3, sample)
    assert calls == [0, 1, 2, 2]
    assert [r["item"] for r in results] == list(range(7))
    with pytest.raises(ValueError, match="contains other items than batch 0"):
        rlhf_loop._run_batches(tmp_path, 7, 2, sample)


# ---------------------------------------------------------------------------------------------
# Runs of the experiment.


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    """One JAX compilation cache for every run of the session: later runs load the programs
    that earlier ones compiled."""
    return tmp_path_factory.getbasetemp() / "rlhf_compilation_cache"


def single_device_env():
    env = dict(os.environ)
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_experiment(workdir, config, cache, *flags):
    command = [sys.executable, "-m", "experiments.rlhf", f"--config={config}",
               f"--workdir={workdir}", f"--compilation_cache={cache}", *flags]
    return subprocess.run(command, cwd=REPO, env=single_device_env(), capture_output=True,
                          text=True, timeout=900)


def stage_events(workdir):
    lines = (workdir / "stages.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_interrupted_run_continues(tmp_path, compilation_cache):
    workdir = tmp_path / "run"
    config = "configs/rlhf.py:tiny,smoke"
    first = run_experiment(workdir, config, compilation_cache, "--stop_after=v1/reward_safety")
    assert first.returncode == 3, first.stderr[-3000:]
    assert "Stopped after stage v1/reward_safety" in first.stdout
    finished = ["sft/train", "sft/eval", "v1/comparisons", "v1/reward_helpfulness",
                "v1/reward_safety"]
    assert [e["stage"] for e in stage_events(workdir) if e["event"] == "finished"] == finished
    done_times = {stage: (workdir / stage / "DONE").stat().st_mtime_ns for stage in finished}
    comparisons_file = workdir / "v1" / "comparisons" / "train.jsonl"
    comparisons = comparisons_file.read_bytes()
    assert not (workdir / "v1" / "rejection_sampling").exists()

    second = run_experiment(workdir, config, compilation_cache)
    assert second.returncode == 0, second.stderr[-3000:]
    events = stage_events(workdir)[len(finished) * 2:]
    # The finished stages are skipped, never started again; every other stage runs once.
    assert [e["stage"] for e in events if e["event"] == "skipped"] == finished
    started = [e["stage"] for e in events if e["event"] == "started"]
    assert not set(started) & set(finished)
    assert started == rlhf_loop.stage_names(rlhf_configs.get_config("tiny,smoke"))[
        len(finished):]
    for stage, mtime in done_times.items():
        assert (workdir / stage / "DONE").stat().st_mtime_ns == mtime
    assert comparisons_file.read_bytes() == comparisons

    summary = json.loads((workdir / "summary.json").read_text())
    assert [row["name"] for row in summary["rows"]] == ["SFT", "V1", "V2"]
    v2 = summary["rows"][2]
    assert v2["stages"] == ["rejection_sampling", "ppo", "ghost_attention"]
    for baseline in ("sft", "previous"):
        for judge in ("reward_model", "gold"):
            counts = v2["win_rates"][baseline][judge]
            assert counts["wins"] + counts["losses"] + counts["ties"] == 8
    report = (workdir / "report.md").read_text()
    assert "| V2 | rejection_sampling, ppo, ghost_attention |" in report
    assert "V2" in second.stdout.split("Report:")[-1]

    # A finished run only skips stages and writes the report again.
    num_events = len(stage_events(workdir))
    third = run_experiment(workdir, config, compilation_cache)
    assert third.returncode == 0, third.stderr[-3000:]
    events = stage_events(workdir)[num_events:]
    assert len(events) == len(started) + len(finished)
    assert {e["event"] for e in events} == {"skipped"}



def test_hh_rlhf_one_version(tmp_path, compilation_cache, shared):
    workdir = tmp_path / "hh"
    result = run_experiment(workdir, "configs/rlhf.py:hh_rlhf,smoke", compilation_cache,
                            "--config.num_versions=1", "--config.ppo_from_version=1")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    sft_row, v1 = summary["rows"]
    # No gold annotator exists for human comparisons: only the reward models judge.
    assert sft_row["gold"] is None
    assert v1["gold"] is None
    assert set(v1["win_rates"]["sft"]) == {"reward_model"}
    assert v1["stages"] == ["rejection_sampling", "ppo"]
    held_out = v1["reward_models"]["safety"]
    # HH-RLHF comparisons carry no strength rating: every held-out pair is of level unknown.
    assert held_out["per_level"]["unknown"]["pairs"] == held_out["pairs"] > 0
    comparisons = read_comparisons_jsonl(workdir / "v1" / "comparisons" / "train.jsonl")
    assert comparisons and all(c.source.startswith("hh-rlhf") for c in comparisons)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    assert config.annotator.kind == "file"
    assert config.num_versions == 1
