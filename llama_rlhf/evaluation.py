"""Evaluation of the policies of the iterative RLHF loop, and the loop's report.

Each RLHF version answers the same held-out prompts, sampled with a fixed key. The answers are
compared with the SFT model's and the previous version's answers to the same prompts:

  * Win rates. A judge sees a pair of answers in both orders, (A, B) and (B, A), so that a
    judge that prefers one position cannot inflate a win rate. A pair is a win for A when A is
    preferred in both orders, a loss when B is preferred in both, and a tie otherwise. The
    win rate is wins / (wins + losses); ties are reported beside it. Llama 2's model-based
    evaluation (Touvron et al. 2023, section 3.4.2) judged both orders the same way. The
    judges here score each answer alone (a reward model, the gold scorer), so both orders
    agree, and a pair is a tie exactly when the scores differ by at most a tie margin.
  * The reward-model judge is Llama 2's gated reward: σ(safety score) for a safety prompt or
    when σ(safety score) < 0.15, else σ(helpfulness score) (`ppo.gate_scores`).
  * KL to SFT: the mean over answers of Σ_t (log π(y_t) - log π_SFT(y_t)), the k1 estimator
    summed over the answer's tokens, with log π from the sampler and log π_SFT teacher-forced
    with the same logit processing (`sampling.response_logprobs`). Its expectation is
    KL(π ‖ π_SFT) of the distributions sampled from.

The report (`write_report`) is markdown with one table per topic and PNG plots of the gold
score, the win rates and the KL per version; `summary_text` is the one-screen version for the
end of a run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import matplotlib
import numpy as np

from llama_rlhf import losses
from llama_rlhf import sampling as sampling_lib
from llama_rlhf.reward_model.evaluation import accuracy_table_markdown, write_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPORT_FILE = "report.md"
GOLD_PLOT_FILE = "gold_score_by_version.png"
WIN_RATE_PLOT_FILE = "win_rates_by_version.png"
KL_PLOT_FILE = "kl_to_sft_by_version.png"

# judge(first, second) -> [N] preferences: +1 the first answer, -1 the second, 0 a tie.
PairJudge = Callable[[Sequence[Any], Sequence[Any]], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Win rates.


def preferences_from_scores(first_scores: Sequence[float], second_scores: Sequence[float],
                            tie_margin: float = 0.0) -> np.ndarray:
    """Compares two answers per prompt by score: +1 when s_first - s_second > margin, -1 when
    s_second - s_first > margin, 0 otherwise.

    Raises:
      ValueError: the score arrays differ in shape, contain NaN, or the margin is negative.
    """
    first = np.asarray(first_scores, np.float64)
    second = np.asarray(second_scores, np.float64)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"Expected two score arrays of one shape [N], got {first.shape} and "
                         f"{second.shape}.")
    if np.isnan(first).any() or np.isnan(second).any():
        raise ValueError("Cannot compare answers with a NaN score.")
    if not tie_margin >= 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}.")
    gap = first - second
    return np.where(gap > tie_margin, 1, np.where(gap < -tie_margin, -1, 0)).astype(np.int8)


def score_judge(tie_margin: float = 0.0) -> PairJudge:
    """Returns a judge that compares answers by their scores (`preferences_from_scores`)."""
    return functools.partial(preferences_from_scores, tie_margin=tie_margin)


@dataclasses.dataclass(frozen=True)
class WinRate:
    """The outcome of comparing policy A with policy B on the same prompts.

    Attributes:
      wins: prompts where A's answer is preferred in both orders.
      losses: prompts where B's answer is preferred in both orders.
      ties: the other prompts (no preference, or the orders disagree).
    """

    wins: int
    losses: int
    ties: int

    @property
    def pairs(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def win_rate(self) -> float:
        """wins / (wins + losses); NaN when every pair is a tie."""
        decided = self.wins + self.losses
        return self.wins / decided if decided else math.nan

    @property
    def tie_fraction(self) -> float:
        return self.ties / self.pairs if self.pairs else math.nan

    def to_json(self) -> dict[str, Any]:
        return {"wins": self.wins, "losses": self.losses, "ties": self.ties,
                "win_rate": _finite_or_none(self.win_rate),
                "tie_fraction": _finite_or_none(self.tie_fraction)}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> WinRate:
        return cls(int(record["wins"]), int(record["losses"]), int(record["ties"]))


def win_rate_both_orders(judge: PairJudge, answers_a: Sequence[Any], answers_b: Sequence[Any]
                         ) -> WinRate:
    """Judges each pair in both orders and counts A's wins, losses and ties.

    Args:
      judge: (first answers, second answers) -> [N] preferences, +1 for the first answer.
      answers_a, answers_b: what the judge reads for policy A and policy B, one per prompt
        (texts, or scores for a judge that compares scores).

    Returns:
      A win for A when judge(A, B) = +1 and judge(B, A) = -1, a loss when judge(A, B) = -1 and
      judge(B, A) = +1, a tie otherwise.
    """
    if len(answers_a) != len(answers_b):
        raise ValueError(f"Expected one answer of each policy per prompt, got {len(answers_a)} "
                         f"and {len(answers_b)}.")
    a_first = np.asarray(judge(answers_a, answers_b))
    b_first = np.asarray(judge(answers_b, answers_a))
    if a_first.shape != (len(answers_a),) or b_first.shape != (len(answers_a),):
        raise ValueError(f"The judge returned preferences of shape {a_first.shape} and "
                         f"{b_first.shape}, expected ({len(answers_a)},).")
    wins = int(np.sum((a_first > 0) & (b_first < 0)))
    losses = int(np.sum((a_first < 0) & (b_first > 0)))
    return WinRate(wins, losses, len(answers_a) - wins - losses)


def gold_metrics(gold_scorer, prompts: Sequence[Any], answers: Sequence[str]) -> dict[str, float]:
    """Means of a gold scorer's judgement of one answer per prompt.

    Args:
      gold_scorer: an `annotators.GoldScorer`.
      prompts: `ppo.Prompt`s (their `dialog` is judged) or anything the scorer accepts.
      answers: one answer text per prompt.

    Returns:
      {"gold": the gated score, "gold_helpfulness", "gold_safety", "unsafe_fraction": the
      share of answers with harmful instructions}.
    """
    dialogs = [getattr(prompt, "dialog", prompt) for prompt in prompts]
    scores = gold_scorer.score_batch(dialogs, list(answers))
    return {
        "gold": float(np.mean(scores["gold"])),
        "gold_helpfulness": float(np.mean(scores["helpfulness"])),
        "gold_safety": float(np.mean(scores["safety"])),
        "unsafe_fraction": float(np.mean(~scores["is_safe"])),
    }


# ---------------------------------------------------------------------------------------------
# KL to the SFT model.


@functools.partial(jax.jit, static_argnames=("model_config", "temperature", "top_k", "top_p"))
def _sequence_logprobs(params, tokens, mask, *, model_config, temperature, top_k, top_p):
    return sampling_lib.sequence_logprobs(model_config, params, tokens, mask,
                                          temperature=temperature, top_k=top_k, top_p=top_p)


def reference_logprobs(model_config, params, output: sampling_lib.SampleOutput,
                       sampling: sampling_lib.SamplingConfig) -> np.ndarray:
    """Teacher-forces a reference model on sampled answers: log π_ref(y_t) [B*n, N], 0 on
    padding, with the logit processing of `sampling` (as `sampling.response_logprobs`)."""
    tokens, mask = output.full_sequences()
    logprobs = _sequence_logprobs(params, tokens, mask, model_config=model_config,
                                  temperature=float(sampling.temperature),
                                  top_k=sampling.top_k or None, top_p=float(sampling.top_p))
    prompt_length = output.prompt_tokens.shape[1]
    return np.asarray(logprobs)[:, prompt_length:]


def sequence_kl(logp: np.ndarray, ref_logp: np.ndarray, response_mask: np.ndarray,
                kind: str = "k1") -> np.ndarray:
    """Sums a per-token KL estimator over each answer's real tokens: [B, N] -> [B].

    KL_b = Σ_t mask[b, t] k(logp[b, t], ref_logp[b, t]) with k from `losses.kl_estimate`.
    """
    mask = np.asarray(response_mask, bool)
    per_token = np.asarray(losses.kl_estimate(np.asarray(logp, np.float32),
                                              np.asarray(ref_logp, np.float32), kind))
    return np.sum(np.where(mask, per_token, 0.0), axis=1)


# ---------------------------------------------------------------------------------------------
# Report.


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _win_rate_cell(record: Mapping[str, Any] | None) -> str:
    """Formats a win rate and its counts as '62.5% (40/24/0)' (wins/losses/ties)."""
    if record is None:
        return "–"
    rate = record.get("win_rate")
    rate_text = "–" if rate is None else f"{100.0 * rate:.1f}%"
    return f"{rate_text} ({record['wins']}/{record['losses']}/{record['ties']})"


def _get(row: Mapping[str, Any], *keys: str) -> Any:
    """Returns row[k1][k2]..., or None when a key is missing or a value on the way is None."""
    value: Any = row
    for key in keys:
        if not isinstance(value, Mapping) or value.get(key) is None:
            return None
        value = value[key]
    return value


def policy_table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Formats a table with one line per policy: stages, gold scores, reward, KL, length."""
    lines = [
        "| policy | stages | gold | gold, helpfulness prompts | gold, safety prompts | "
        "unsafe answers | "
        "RM reward (own RMs) | KL to SFT (nats) | answer tokens | ended with EOS |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        unsafe = _get(row, "gold", "unsafe_fraction")
        finished = _get(row, "answers", "finished_fraction")
        lines.append(
            f"| {row['name']} | {', '.join(row.get('stages', [])) or '–'} "
            f"| {_number(_get(row, 'gold', 'gold'))} "
            f"| {_number(_get(row, 'gold', 'helpfulness_prompts'))} "
            f"| {_number(_get(row, 'gold', 'safety_prompts'))} "
            f"| {'–' if unsafe is None else f'{100 * unsafe:.1f}%'} "
            f"| {_number(_get(row, 'reward', 'gated'))} "
            f"| {_number(_get(row, 'kl_to_sft', 'k1'), 2)} "
            f"| {_number(_get(row, 'answers', 'length'), 1)} "
            f"| {'–' if finished is None else f'{100 * finished:.1f}%'} |")
    return "\n".join(lines) + "\n"


def win_rate_table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Formats a table of each version's win rates against SFT and the previous version."""
    lines = [
        "| policy | vs SFT, reward models | vs SFT, gold | vs previous, reward models | "
        "vs previous, gold |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not row.get("win_rates"):
            continue
        rates = row["win_rates"]
        lines.append(
            f"| {row['name']} | {_win_rate_cell(_get(rates, 'sft', 'reward_model'))} "
            f"| {_win_rate_cell(_get(rates, 'sft', 'gold'))} "
            f"| {_win_rate_cell(_get(rates, 'previous', 'reward_model'))} "
            f"| {_win_rate_cell(_get(rates, 'previous', 'gold'))} |")
    return "\n".join(lines) + "\n"


def comparisons_table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Formats a table of each version's new comparisons and reward-model training data."""
    lines = [
        "| version | new comparisons | on safety prompts | held out | reward-model training "
        "pairs (helpfulness / safety) | gold of chosen / rejected |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        data = row.get("comparisons")
        if not data:
            continue
        training = row.get("reward_model_pairs") or {}
        chosen, rejected = data.get("mean_gold_chosen"), data.get("mean_gold_rejected")
        gold = "–" if chosen is None else f"{chosen:.3f} / {_number(rejected)}"
        lines.append(
            f"| {row['name']} | {data['new']} | {data['safety']} | {data['held_out']} "
            f"| {training.get('helpfulness', '–')} / {training.get('safety', '–')} | {gold} |")
    return "\n".join(lines) + "\n"


def reward_model_table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Formats the held-out accuracy per preference level of every version's reward models."""
    entries = {}
    for row in rows:
        for kind, metrics in (row.get("reward_models") or {}).items():
            entries[f"{row['name']} {kind}"] = metrics
    return accuracy_table_markdown(entries) if entries else ""


def _save_figure(figure, path: pathlib.Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex}{path.suffix}")
    try:
        figure.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        tmp.unlink(missing_ok=True)


def plot_gold(rows: Sequence[Mapping[str, Any]], path: pathlib.Path) -> bool:
    """Plots the mean gold score per policy, over all prompts and per prompt kind.

    Returns:
      False, writing nothing, when no row has gold scores.
    """
    rows = [row for row in rows if _get(row, "gold", "gold") is not None]
    if not rows:
        return False
    names = [row["name"] for row in rows]
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for key, label in (("gold", "all prompts"), ("helpfulness_prompts", "helpfulness prompts"),
                       ("safety_prompts", "safety prompts")):
        values = [row["gold"].get(key) for row in rows]
        if any(value is not None for value in values):
            axis.plot(names, [math.nan if v is None else v for v in values], marker="o",
                      label=label)
    axis.set_ylabel("mean gold score over held-out prompts")
    axis.set_title("Gold annotator's score of each policy")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    _save_figure(figure, path)
    return True


def plot_win_rates(rows: Sequence[Mapping[str, Any]], path: pathlib.Path) -> bool:
    """Plots the win rates against SFT and the previous version.

    Returns:
      False, writing nothing, when no row has win rates.
    """
    rows = [row for row in rows if row.get("win_rates")]
    if not rows:
        return False
    names = [row["name"] for row in rows]
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for baseline in ("sft", "previous"):
        for judge, style in (("reward_model", "-"), ("gold", "--")):
            values = [_get(row, "win_rates", baseline, judge, "win_rate") for row in rows]
            if all(value is None for value in values):
                continue
            values = [math.nan if value is None else 100.0 * value for value in values]
            label = f"vs {'SFT' if baseline == 'sft' else 'previous version'}, " + (
                "reward models" if judge == "reward_model" else "gold annotator")
            axis.plot(names, values, style, marker="o", label=label)
    axis.axhline(50.0, color="grey", linewidth=1)
    axis.set_ylim(0, 100)
    axis.set_ylabel("win rate, wins / (wins + losses) (%)")
    axis.set_title("Win rates on held-out prompts")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    _save_figure(figure, path)
    return True


def plot_kl(rows: Sequence[Mapping[str, Any]], path: pathlib.Path) -> bool:
    """Plots the mean KL to SFT per policy.

    Returns:
      False, writing nothing, when no row has a KL value.
    """
    rows = [row for row in rows if _get(row, "kl_to_sft", "k1") is not None]
    if not rows:
        return False
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    axis.plot([row["name"] for row in rows], [row["kl_to_sft"]["k1"] for row in rows],
              marker="o")
    axis.set_ylabel("mean KL(policy ‖ SFT) per answer (nats)")
    axis.set_title("Distance from the SFT model")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, path)
    return True


def write_report(directory: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *,
                 title: str, description: str, stage_seconds: Mapping[str, float] | None = None
                 ) -> pathlib.Path:
    """Writes `report.md` and its PNG plots into `directory`.

    Args:
      directory: the loop's workdir.
      rows: one dict per policy, SFT first, with the keys name, stages, gold, reward,
        kl_to_sft, answers, win_rates, comparisons, reward_model_pairs and reward_models
        (missing keys and None values are shown as "–").
      title: the report's heading.
      description: markdown paragraphs under the heading (the run's settings).
      stage_seconds: stage name -> wall-clock seconds, for a table of run times.

    Returns:
      The path of the report.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sections = [f"# {title}\n", description.strip() + "\n"]
    sections += ["## Policies on the held-out prompts\n", policy_table_markdown(rows)]
    sections += ["## Win rates\n",
                 "Each cell is A's win rate, wins / (wins + losses), with (wins/losses/ties) "
                 "over the held-out prompts; both answer orders are judged. The reward-model "
                 "judge is the gated reward of the version's own reward models, the models "
                 "its training optimised, so it favours the version; the gold annotator is "
                 "independent of training.\n", win_rate_table_markdown(rows)]
    if any(row.get("comparisons") for row in rows):
        sections += ["## Comparisons\n", comparisons_table_markdown(rows)]
    table = reward_model_table_markdown(rows)
    if table:
        sections += ["## Reward models on each version's held-out comparisons\n", table]

    plots = []
    for plot, file_name, caption in (
            (plot_gold, GOLD_PLOT_FILE, "gold score"),
            (plot_win_rates, WIN_RATE_PLOT_FILE, "win rates"),
            (plot_kl, KL_PLOT_FILE, "KL to SFT")):
        if plot(rows, directory / file_name):
            plots.append(f"![{caption}]({file_name})\n")
    if plots:
        sections += ["## Plots\n", "\n".join(plots)]
    if stage_seconds:
        lines = ["| stage | seconds |", "|---|---:|"]
        lines += [f"| {name} | {seconds:.1f} |" for name, seconds in stage_seconds.items()]
        lines.append(f"| all | {sum(stage_seconds.values()):.1f} |")
        sections += ["## Stage run times\n", "\n".join(lines) + "\n"]
    path = directory / REPORT_FILE
    write_atomic(path, "\n".join(sections))
    return path


def summary_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Returns a one-screen plain-text table: per policy its gold score, win rates against
    SFT (reward models, gold) and against the previous version, and KL to SFT."""
    header = (f"{'policy':<8} {'gold':>6} {'unsafe':>7} {'RM win vs SFT':>14} "
              f"{'gold win vs SFT':>16} {'RM win vs prev':>15} {'gold win vs prev':>17} "
              f"{'KL to SFT':>10}")
    lines = [header, "-" * len(header)]

    def rate(row, baseline, judge):
        value = _get(row, "win_rates", baseline, judge, "win_rate")
        return "–" if value is None else f"{100 * value:.1f}%"

    for row in rows:
        unsafe = _get(row, "gold", "unsafe_fraction")
        lines.append(
            f"{row['name']:<8} {_number(_get(row, 'gold', 'gold')):>6} "
            f"{'–' if unsafe is None else f'{100 * unsafe:.1f}%':>7} "
            f"{rate(row, 'sft', 'reward_model'):>14} {rate(row, 'sft', 'gold'):>16} "
            f"{rate(row, 'previous', 'reward_model'):>15} {rate(row, 'previous', 'gold'):>17} "
            f"{_number(_get(row, 'kl_to_sft', 'k1'), 2):>10}")
    return "\n".join(lines)
