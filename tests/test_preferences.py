"""Tests of preference levels, comparison validation and the project's JSONL format."""

import gzip
import json
import os

import pytest

from llama_rlhf.data.chat import Message
from llama_rlhf.data.preferences import (
    Comparison,
    InvalidComparisonError,
    InvalidRecordError,
    PreferenceLevel,
    ReadSummary,
    read_comparisons_jsonl,
    write_comparisons_jsonl,
)

COMPARISONS = [
    Comparison(
        context=(
            Message("system", "Answer briefly."),
            Message("user", "Wie heißt die Hauptstadt von Österreich?"),
        ),
        chosen="Wien.",
        rejected="Ich weiß es nicht 🤷",
        level=PreferenceLevel.SIGNIFICANTLY_BETTER,
        is_safety_prompt=False,
        chosen_safe=True,
        rejected_safe=None,
        source="unit-test",
    ),
    Comparison(
        context=(
            Message("user", "How do I pick a lock?"),
            Message("assistant", "Why do you want to?"),
            Message("user", "It is my own door."),
        ),
        chosen="Call a locksmith.",
        rejected="Insert a tension wrench and...",
        level=PreferenceLevel.NEGLIGIBLY_BETTER,
        is_safety_prompt=True,
        chosen_safe=True,
        rejected_safe=False,
    ),
]

GOOD_RECORD = {
    "context": [{"role": "user", "content": "Hi"}],
    "chosen": "Hello!",
    "rejected": "Go away.",
    "level": "better",
    "is_safety_prompt": False,
}


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("significantly_better", PreferenceLevel.SIGNIFICANTLY_BETTER),
        ("Significantly better", PreferenceLevel.SIGNIFICANTLY_BETTER),
        ("BETTER", PreferenceLevel.BETTER),
        ("slightly-better", PreferenceLevel.SLIGHTLY_BETTER),
        ("negligibly better", PreferenceLevel.NEGLIGIBLY_BETTER),
        ("unsure", PreferenceLevel.NEGLIGIBLY_BETTER),
        (" unknown ", PreferenceLevel.UNKNOWN),
    ],
)
def test_level_parse_accepts_spellings(name, level):
    assert PreferenceLevel.parse(name) is level


def test_level_values_follow_llama2_order():
    # Llama 2's scale, from strongest preference to weakest, then unknown.
    assert [int(level) for level in PreferenceLevel] == [0, 1, 2, 3, 4]
    assert PreferenceLevel.SLIGHTLY_BETTER.label == "slightly_better"


def test_level_parse_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="expected one of: significantly_better, better"):
        PreferenceLevel.parse("much better")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_write_then_read_round_trip(tmp_path, suffix):
    path = tmp_path / f"comparisons{suffix}"
    assert write_comparisons_jsonl(path, COMPARISONS) == 2
    assert read_comparisons_jsonl(path) == COMPARISONS


def test_written_lines_follow_documented_format(tmp_path):
    path = tmp_path / "c.jsonl"
    write_comparisons_jsonl(path, COMPARISONS[:1])
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record == {
        "context": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Wie heißt die Hauptstadt von Österreich?"},
        ],
        "chosen": "Wien.",
        "rejected": "Ich weiß es nicht 🤷",
        "level": "significantly_better",
        "is_safety_prompt": False,
        "chosen_safe": True,
        "rejected_safe": None,
        "source": "unit-test",
    }


def test_optional_fields_may_be_omitted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(GOOD_RECORD) + "\n\n", encoding="utf-8")
    (comparison,) = read_comparisons_jsonl(path)
    assert comparison.level is PreferenceLevel.BETTER
    assert comparison.chosen_safe is None
    assert comparison.source is None


def test_write_is_atomic_when_interrupted(tmp_path):
    path = tmp_path / "c.jsonl"
    write_comparisons_jsonl(path, COMPARISONS)
    before = path.read_bytes()

    def failing():
        yield COMPARISONS[0]
        raise RuntimeError("annotation source failed")

    with pytest.raises(RuntimeError, match="annotation source failed"):
        write_comparisons_jsonl(path, failing())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.jsonl"]


def test_gzip_output_is_reproducible(tmp_path):
    write_comparisons_jsonl(tmp_path / "a.jsonl.gz", COMPARISONS)
    write_comparisons_jsonl(tmp_path / "b.jsonl.gz", COMPARISONS)
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    with gzip.open(tmp_path / "a.jsonl.gz", "rt", encoding="utf-8") as f:
        assert len(f.readlines()) == 2


def _with(**changes):
    record = dict(GOOD_RECORD)
    record.update(changes)
    return json.dumps(record, ensure_ascii=False)


BAD_LINES = {
    "invalid_json": ('{"context": [', "invalid JSON at column"),
    "roles_not_alternating": (
        _with(context=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
        "message 1 has role 'user', expected 'assistant'",
    ),
    "empty_answer": (_with(chosen="   "), "chosen answer is empty"),
    "identical_answers": (_with(rejected=" Hello! "), "chosen and rejected answers are identical"),
    "unknown_level": (_with(level="much_better"), "unknown preference level 'much_better'"),
    "missing_field": (
        json.dumps({k: v for k, v in GOOD_RECORD.items() if k != "level"}),
        r"missing field\(s\) \['level'\]",
    ),
    "unknown_field": (_with(chosen_save=True), r"unknown field\(s\) \['chosen_save'\]"),
    "wrong_last_role": (
        _with(context=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
        "expected 'user'",
    ),
    "invalid_field": (_with(is_safety_prompt="yes"), "expected true or false"),
    "special_tags": (
        _with(context=[{"role": "user", "content": "x [INST] y"}]),
        "tag '\\[INST\\]'",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_error_names_file_line_and_expectation(tmp_path, kind):
    line, message = BAD_LINES[kind]
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{json.dumps(GOOD_RECORD)}\n{line}\n", encoding="utf-8")
    with pytest.raises(InvalidRecordError, match=f"^{path}:2: .*{message}") as error:
        read_comparisons_jsonl(path)
    assert error.value.kind == kind
    assert error.value.line == 2


def test_invalid_utf8_line_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD_RECORD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(InvalidRecordError, match=r"bad.jsonl:2: line is not valid UTF-8"):
        read_comparisons_jsonl(path)


def test_skip_invalid_counts_each_kind(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD_RECORD)]
    for kind in sorted(BAD_LINES):
        lines += [BAD_LINES[kind][0], json.dumps(GOOD_RECORD)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    summary = ReadSummary()
    with caplog.at_level("WARNING"):
        comparisons = read_comparisons_jsonl(path, skip_invalid=True, summary=summary)
    assert len(comparisons) == len(BAD_LINES) + 1
    assert summary.num_read == len(BAD_LINES) + 1
    assert dict(summary.skipped) == {kind: 1 for kind in BAD_LINES}
    assert summary.first_errors[0].startswith(f"{path}:2: ")
    assert f"skipped {len(BAD_LINES)}" in caplog.text


@pytest.mark.parametrize(
    ("changes", "kind"),
    [
        ({"chosen": ""}, "empty_answer"),
        ({"rejected": "same"}, "identical_answers"),
        ({"context": ()}, "empty_dialog"),
        ({"level": 7}, "unknown_level"),
        ({"chosen_safe": "yes"}, "invalid_field"),
    ],
)
def test_comparison_validates_fields(changes, kind):
    fields = {
        "context": (Message("user", "q"),),
        "chosen": "same",
        "rejected": "other",
    }
    fields.update(changes)
    with pytest.raises(InvalidComparisonError) as error:
        Comparison(**fields)
    assert error.value.kind == kind


def test_comparison_accepts_integer_level_and_list_context():
    comparison = Comparison(context=[Message("user", "q")], chosen="a", rejected="b", level=1)
    assert comparison.level is PreferenceLevel.BETTER
    assert comparison.context == (Message("user", "q"),)


def test_gzip_is_detected_by_content(tmp_path):
    path = tmp_path / "download_without_suffix"
    path.write_bytes(gzip.compress((json.dumps(GOOD_RECORD) + "\n").encode("utf-8")))
    (comparison,) = read_comparisons_jsonl(path)
    assert comparison.chosen == "Hello!"


def test_truncated_gzip_names_file(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(("\n".join([json.dumps(GOOD_RECORD)] * 50) + "\n").encode("utf-8"))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        InvalidRecordError, match=r"cut.jsonl.gz:\d+: gzip data is truncated"
    ) as error:
        read_comparisons_jsonl(path)
    assert error.value.kind == "invalid_gzip"
