"""Parsing Anthropic's HH-RLHF preference data into `Comparison` records.

Each HH-RLHF line is a JSON object with two whole transcripts, `chosen` and `rejected`, in
the form "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ...". The two
transcripts share every turn except the last assistant turn. The data has no preference
strength, so every comparison gets `PreferenceLevel.UNKNOWN`, and no per-answer safety labels.
Prompts of the harmless-base subset were written to elicit harmful answers, so its comparisons
are safety prompts; the helpful-* subsets are not.

Real transcripts break the format now and then, for example with two "Assistant:" turns in a
row, an empty final answer, or chosen and rejected transcripts that differ before the last
turn. Such pairs raise an error naming the file and line, or are counted and skipped with
`skip_invalid=True`.
"""

from __future__ import annotations

import os
import re
from typing import Any

from llama_rlhf.data.chat import Message
from llama_rlhf.data.preferences import (
    Comparison,
    InvalidComparisonError,
    PreferenceLevel,
    ReadSummary,
    read_jsonl_records,
)

# Subset name -> whether its prompts are safety prompts.
SUBSETS: dict[str, bool] = {
    "harmless-base": True,
    "helpful-base": False,
    "helpful-online": False,
    "helpful-rejection-sampled": False,
}

_ROLE_OF_SPEAKER = {"Human": "user", "Assistant": "assistant"}
_SPEAKER_SEPARATOR = re.compile(r"\n\n(Human|Assistant):")
_TRANSCRIPT_START = "\n\nHuman:"


def parse_transcript(text: str) -> list[Message]:
    """Split one HH-RLHF transcript into user and assistant messages.

    A turn starts at "\\n\\nHuman:" or "\\n\\nAssistant:", and its content is the text up to
    the next such separator. Surrounding whitespace is stripped, as the chat format strips it
    anyway. A "Human:" without the two newlines before it is part of the content.

    Raises:
        InvalidComparisonError: If the text does not start with "\\n\\nHuman:" or its roles
            do not alternate.
    """
    if not isinstance(text, str):
        raise InvalidComparisonError(
            "invalid_field", f"transcript is a {type(text).__name__}, expected a string"
        )
    if not text.startswith(_TRANSCRIPT_START):
        raise InvalidComparisonError(
            "invalid_transcript",
            f"transcript starts with {text[:20]!r}, expected {_TRANSCRIPT_START!r}",
        )
    # re.split with one group returns ["", speaker, content, speaker, content, ...].
    parts = _SPEAKER_SEPARATOR.split(text)
    speakers, contents = parts[1::2], parts[2::2]
    messages = []
    for index, (speaker, content) in enumerate(zip(speakers, contents, strict=True)):
        if index > 0 and speaker == speakers[index - 1]:
            raise InvalidComparisonError(
                "roles_not_alternating",
                f"transcript turns {index - 1} and {index} are both {speaker!r}, expected "
                "Human and Assistant turns to alternate",
            )
        messages.append(Message(_ROLE_OF_SPEAKER[speaker], content.strip()))
    return messages


def parse_pair(
    chosen_text: str,
    rejected_text: str,
    *,
    is_safety_prompt: bool,
    source: str | None = None,
) -> Comparison:
    """Build a Comparison from a chosen and a rejected HH-RLHF transcript.

    Raises:
        InvalidComparisonError: If a transcript is malformed or does not end with an
            assistant turn, if the transcripts differ before their last turn, or if an answer
            is empty or both answers are identical.
    """
    dialogs = {}
    for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        try:
            messages = parse_transcript(text)
        except InvalidComparisonError as error:
            raise InvalidComparisonError(error.kind, f"{name} transcript: {error}") from None
        if messages[-1].role != "assistant":
            raise InvalidComparisonError(
                "missing_answer",
                f"{name} transcript ends with a Human turn, expected a final Assistant turn",
            )
        dialogs[name] = messages

    chosen_context, rejected_context = dialogs["chosen"][:-1], dialogs["rejected"][:-1]
    if chosen_context != rejected_context:
        first_difference = next(
            (
                i
                for i, (a, b) in enumerate(zip(chosen_context, rejected_context, strict=False))
                if a != b
            ),
            min(len(chosen_context), len(rejected_context)),
        )
        raise InvalidComparisonError(
            "contexts_differ",
            f"chosen and rejected transcripts differ at turn {first_difference} (they have "
            f"{len(chosen_context) + 1} and {len(rejected_context) + 1} turns), expected them "
            "to differ only in the last Assistant turn",
        )

    return Comparison(
        context=tuple(chosen_context),
        chosen=dialogs["chosen"][-1].content,
        rejected=dialogs["rejected"][-1].content,
        level=PreferenceLevel.UNKNOWN,
        is_safety_prompt=is_safety_prompt,
        source=source,
    )


def comparison_from_hh_record(record: Any, *, subset: str) -> Comparison:
    """Build a Comparison from one decoded HH-RLHF JSON line of the given subset."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise InvalidComparisonError(
            "missing_field",
            f"record {str(record)[:60]!r} is not an object with 'chosen' and 'rejected' keys",
        )
    return parse_pair(
        record["chosen"],
        record["rejected"],
        is_safety_prompt=SUBSETS[subset],
        source=f"hh-rlhf/{subset}",
    )


def check_subset(subset: str) -> None:
    """Raise ValueError unless `subset` is one of the four HH-RLHF preference subsets."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown HH-RLHF subset {subset!r}, expected one of {list(SUBSETS)}")


def read_hh_rlhf_jsonl(
    path: str | os.PathLike,
    *,
    subset: str,
    skip_invalid: bool = False,
    summary: ReadSummary | None = None,
) -> list[Comparison]:
    """Read an HH-RLHF JSONL file, plain or gzip-compressed, into comparisons.

    Args:
        path: A file such as `harmless-base/train.jsonl.gz` of the official repository.
        subset: The subset the file belongs to, one of `SUBSETS`; it sets
            `is_safety_prompt` and `source`.
        skip_invalid: Skip bad lines and count them in `summary` (and the log) instead of
            raising.
        summary: Filled with the number of read and skipped records when given.

    Raises:
        InvalidRecordError: For the first bad line, unless `skip_invalid`; the message names
            the file, the line and what was expected.
    """
    check_subset(subset)
    records = read_jsonl_records(
        path,
        lambda record: comparison_from_hh_record(record, subset=subset),
        skip_invalid=skip_invalid,
        summary=summary,
    )
    return [comparison for _, comparison in records]
