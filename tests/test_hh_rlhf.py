"""Tests of HH-RLHF transcript parsing and of the offline tensorflow-datasets builder."""

import gzip
import json
import re
import socket

import pytest

from llama_rlhf.data import tfds_hh_rlhf
from llama_rlhf.data.chat import Message
from llama_rlhf.data.hh_rlhf import parse_pair, parse_transcript, read_hh_rlhf_jsonl
from llama_rlhf.data.preferences import (
    InvalidComparisonError,
    InvalidRecordError,
    PreferenceLevel,
    ReadSummary,
)

CONTEXT = (
    "\n\nHuman: What can I cook tonight?"
    "\n\nAssistant: Do you have rice?"
    "\n\nHuman: Yes, and eggs.\nAlso an onion."
)
CHOSEN = CONTEXT + "\n\nAssistant: Make egg fried rice: fry the onion, then rice, then eggs."
REJECTED = CONTEXT + "\n\nAssistant: I don't know."


@pytest.fixture(scope="module")
def shared_hh_file(shared):
    return shared / "data/hh-rlhf/harmless-base-2000.jsonl.gz"


def test_parse_transcript_splits_turns():
    assert parse_transcript(CHOSEN) == [
        Message("user", "What can I cook tonight?"),
        Message("assistant", "Do you have rice?"),
        Message("user", "Yes, and eggs.\nAlso an onion."),
        Message("assistant", "Make egg fried rice: fry the onion, then rice, then eggs."),
    ]


def test_parse_transcript_keeps_inline_speaker_names():
    text = "\n\nHuman: Say 'Human: hi'\n\nAssistant: Human: hi"
    assert parse_transcript(text) == [
        Message("user", "Say 'Human: hi'"),
        Message("assistant", "Human: hi"),
    ]


def test_parse_pair_shares_context():
    comparison = parse_pair(CHOSEN, REJECTED, is_safety_prompt=True, source="hh-rlhf/test")
    assert comparison.context == tuple(parse_transcript(CONTEXT))
    assert comparison.chosen == "Make egg fried rice: fry the onion, then rice, then eggs."
    assert comparison.rejected == "I don't know."
    assert comparison.level is PreferenceLevel.UNKNOWN
    assert comparison.is_safety_prompt is True
    assert (comparison.chosen_safe, comparison.rejected_safe) == (None, None)


@pytest.mark.parametrize(
    ("chosen", "rejected", "kind", "message"),
    [
        (
            "\n\nHuman: a\n\nHuman: b\n\nAssistant: c",
            "\n\nHuman: a\n\nHuman: b\n\nAssistant: d",
            "roles_not_alternating",
            "chosen transcript: transcript turns 0 and 1 are both 'Human'",
        ),
        ("Human: a\n\nAssistant: b", REJECTED, "invalid_transcript", "expected '\\\\n\\\\nHuman:'"),
        (CONTEXT, REJECTED, "missing_answer", "chosen transcript ends with a Human turn"),
        (CONTEXT + "\n\nAssistant:", REJECTED, "empty_answer", "chosen answer is empty"),
        (
            CONTEXT + "\n\nAssistant: I don't know. ",
            REJECTED,
            "identical_answers",
            "identical",
        ),
        (
            "\n\nHuman: other question\n\nAssistant: x",
            REJECTED,
            "contexts_differ",
            "differ at turn 0",
        ),
    ],
)
def test_parse_pair_rejects_malformed_pairs(chosen, rejected, kind, message):
    with pytest.raises(InvalidComparisonError, match=message) as error:
        parse_pair(chosen, rejected, is_safety_prompt=False)
    assert error.value.kind == kind


def test_read_errors_name_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    lines = [
        json.dumps({"chosen": CHOSEN, "rejected": REJECTED}),
        json.dumps({"chosen": CHOSEN, "rejected": CHOSEN}),
        "not json",
    ]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(InvalidRecordError, match=rf"^{path}:2: .*identical"):
        read_hh_rlhf_jsonl(path, subset="helpful-base")

    summary = ReadSummary()
    comparisons = read_hh_rlhf_jsonl(
        path, subset="helpful-base", skip_invalid=True, summary=summary
    )
    assert len(comparisons) == 1
    assert comparisons[0].is_safety_prompt is False
    assert comparisons[0].source == "hh-rlhf/helpful-base"
    assert dict(summary.skipped) == {"identical_answers": 1, "invalid_json": 1}


def test_unknown_subset_raises(tmp_path):
    with pytest.raises(ValueError, match="unknown HH-RLHF subset 'harmless'"):
        read_hh_rlhf_jsonl(tmp_path / "x.jsonl", subset="harmless")


def _independent_defects(chosen: str, rejected: str) -> set[str]:
    """Defects of one raw pair found with plain string operations, for comparison."""
    defects = set()
    speakers = {}
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        speakers[name] = re.findall(r"\n\n(Human|Assistant):", text)
        if any(a == b for a, b in zip(speakers[name], speakers[name][1:], strict=False)):
            defects.add("roles_not_alternating")
    last_answers = [text.rsplit("\n\nAssistant:", 1)[1].strip() for text in (chosen, rejected)]
    if not all(last_answers):
        defects.add("empty_answer")
    if last_answers[0] == last_answers[1]:
        defects.add("identical_answers")
    if chosen.rsplit("\n\nAssistant:", 1)[0] != rejected.rsplit("\n\nAssistant:", 1)[0]:
        defects.add("contexts_differ")
    return defects


def test_all_shared_pairs_parse_or_are_reported(shared_hh_file):
    with gzip.open(shared_hh_file, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert len(raw) == 2000

    summary = ReadSummary()
    comparisons = read_hh_rlhf_jsonl(
        shared_hh_file, subset="harmless-base", skip_invalid=True, summary=summary
    )
    assert summary.num_read + summary.num_skipped == 2000
    assert len(comparisons) == summary.num_read

    # Every skipped pair has a defect that plain string checks also find, and every pair
    # without such a defect parses.
    defective = [_independent_defects(r["chosen"], r["rejected"]) for r in raw]
    assert summary.num_skipped == sum(1 for d in defective if d)
    assert set(summary.skipped) <= set().union(*defective)
    assert all(c.is_safety_prompt for c in comparisons)
    assert all(c.context[-1].role == "user" for c in comparisons)


def test_strict_read_stops_at_first_defect(shared_hh_file):
    with gzip.open(shared_hh_file, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    first_bad = next(
        i for i, r in enumerate(raw, start=1) if _independent_defects(r["chosen"], r["rejected"])
    )
    with pytest.raises(InvalidRecordError, match=rf"harmless-base-2000.jsonl.gz:{first_bad}: "):
        read_hh_rlhf_jsonl(shared_hh_file, subset="harmless-base")


@pytest.fixture
def no_network(monkeypatch):
    """Make every socket connection fail, so a download attempt fails the test."""

    def fail_connection(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", fail_connection)
    monkeypatch.setattr(socket, "create_connection", fail_connection)


@pytest.fixture
def local_copy(shared_hh_file, tmp_path):
    """A local copy laid out like the official repository, pointing at the shared file."""
    subset_dir = tmp_path / "hh-rlhf" / "harmless-base"
    subset_dir.mkdir(parents=True)
    (subset_dir / "train.jsonl.gz").symlink_to(shared_hh_file)
    return tmp_path / "hh-rlhf"


def test_tfds_builder_prepares_offline(shared_hh_file, local_copy, tmp_path, no_network):
    data_dir = tmp_path / "tfds"
    comparisons = tfds_hh_rlhf.load_hh_rlhf(
        "harmless-base", "train", data_dir, local_dir=local_copy, skip_invalid=True
    )
    # Expected: the plain JSONL reader on the same file.
    expected = read_hh_rlhf_jsonl(shared_hh_file, subset="harmless-base", skip_invalid=True)
    assert comparisons == expected

    builder = tfds_hh_rlhf.HhRlhf(config="harmless_base", data_dir=str(data_dir))
    assert builder.info.splits["train"].num_examples == len(expected)
    assert sum(builder.info.metadata["skipped"]["train"].values()) == 2000 - len(expected)
    assert list(builder.info.splits) == ["train"]

    # A second load reads the prepared files and needs no local copy.
    assert tfds_hh_rlhf.load_hh_rlhf("harmless-base", "train", data_dir) == expected
    with pytest.raises(ValueError, match="has no 'test' split"):
        tfds_hh_rlhf.load_hh_rlhf("harmless-base", "test", data_dir)


def test_tfds_builder_reads_manual_dir(local_copy, tmp_path, no_network):
    import tensorflow_datasets as tfds

    builder = tfds_hh_rlhf.HhRlhf(
        config="harmless_base", data_dir=str(tmp_path / "tfds"), skip_invalid=True
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=local_copy, try_download_gcs=False)
    )
    source = builder.as_data_source(split="train")
    example = max((source[i] for i in range(len(source))), key=lambda e: int(e["line"]))
    assert int(example["line"]) == 2000
    assert example["level"] == int(PreferenceLevel.UNKNOWN)
    assert bool(example["is_safety_prompt"]) is True


def test_tfds_builder_strict_mode_names_line(local_copy, tmp_path, no_network):
    with pytest.raises(InvalidRecordError, match=r"train.jsonl.gz:\d+: "):
        tfds_hh_rlhf.load_hh_rlhf("harmless-base", "train", tmp_path / "tfds", local_copy)


def test_tfds_builder_rejects_lfs_pointer(tmp_path, no_network):
    subset_dir = tmp_path / "copy" / "helpful-base"
    subset_dir.mkdir(parents=True)
    (subset_dir / "train.jsonl.gz").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n"
    )
    with pytest.raises(ValueError, match="Git LFS pointer"):
        tfds_hh_rlhf.load_hh_rlhf("helpful-base", "train", tmp_path / "tfds", tmp_path / "copy")


def test_tfds_builder_missing_local_files_raise(tmp_path, no_network):
    (tmp_path / "copy").mkdir()
    with pytest.raises(FileNotFoundError, match="has no helpful-online files"):
        tfds_hh_rlhf.load_hh_rlhf("helpful-online", "train", tmp_path / "tfds", tmp_path / "copy")


def test_tfds_builder_has_all_subsets():
    names = [config.name for config in tfds_hh_rlhf.HhRlhf.BUILDER_CONFIGS]
    assert names == [
        "harmless_base",
        "helpful_base",
        "helpful_online",
        "helpful_rejection_sampled",
    ]
