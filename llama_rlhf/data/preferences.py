"""Preference comparisons: records, validation, and the project's JSONL format.

A `Comparison` is what a human (or simulated) annotator produced for one prompt. It contains
the dialog context ending with a user turn, the chosen and the rejected answer, and how
strongly the chosen answer was preferred (one of Llama 2's four levels, or unknown). It also
records whether the prompt is a safety prompt and, when annotated, whether each answer is safe.

JSONL format, one comparison per line, UTF-8, optionally gzip-compressed (the writer compresses
when the file name ends with `.gz`, and the reader recognizes gzip by its content):

    {"context": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "chosen": "...", "rejected": "...", "level": "significantly_better",
     "is_safety_prompt": false, "chosen_safe": true, "rejected_safe": null, "source": "..."}

`context`, `chosen`, `rejected`, `level` and `is_safety_prompt` are required; `chosen_safe`,
`rejected_safe` and `source` may be omitted or null. Any other key is an error. Blank lines
are ignored.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import gzip
import json
import logging
import os
import pathlib
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from llama_rlhf.data.chat import ChatFormatError, Message, validate_dialog

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_KEPT_ERRORS = 10


class PreferenceLevel(enum.IntEnum):
    """How much better the chosen answer is, as rated in Llama 2's preference data.

    Llama 2's annotators picked one of four levels; "negligibly better" also covers "unsure".
    Data without ratings, such as Anthropic HH-RLHF, uses UNKNOWN.
    """

    SIGNIFICANTLY_BETTER = 0
    BETTER = 1
    SLIGHTLY_BETTER = 2
    NEGLIGIBLY_BETTER = 3
    UNKNOWN = 4

    @property
    def label(self) -> str:
        """Lowercase name with underscores, as written in JSONL files."""
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> PreferenceLevel:
        """Parse a level name such as "significantly_better" or "Significantly better".

        Case, spaces, hyphens and underscores do not matter; "unsure" means
        NEGLIGIBLY_BETTER.

        Raises:
            ValueError: For any other name; the message lists the valid names.
        """
        if not isinstance(name, str):
            raise ValueError(f"preference level is {name!r}, expected a level name string")
        key = "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())
        if key == "unsure":
            return cls.NEGLIGIBLY_BETTER
        try:
            return cls[key.upper()]
        except KeyError:
            valid = ", ".join(level.label for level in cls)
            raise ValueError(
                f"unknown preference level {name!r}, expected one of: {valid} (or 'unsure')"
            ) from None


class InvalidComparisonError(ValueError):
    """A comparison that breaks a rule of the format.

    Attributes:
        kind: Short name of the broken rule, such as "empty_answer", for counting skips.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class InvalidRecordError(ValueError):
    """An input line that cannot be read as a comparison; the message names file and line.

    Attributes:
        path: The input file.
        line: 1-based line number.
        kind: Short name of the broken rule.
        reason: What was wrong and what was expected.
    """

    def __init__(self, path: str, line: int, kind: str, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.kind = kind
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One preference comparison between two answers to the same dialog context.

    Attributes:
        context: The dialog before the answers: an optional system message, then user and
            assistant messages alternating, ending with a user message.
        chosen: The preferred answer.
        rejected: The other answer.
        level: How much better `chosen` is.
        is_safety_prompt: Whether the prompt was collected for safety (adversarial)
            annotation rather than helpfulness.
        chosen_safe: Whether the chosen answer was judged safe; None when not annotated.
        rejected_safe: Whether the rejected answer was judged safe; None when not annotated.
        source: Where the comparison comes from, such as "hh-rlhf/harmless-base".
    """

    context: tuple[Message, ...]
    chosen: str
    rejected: str
    level: PreferenceLevel = PreferenceLevel.UNKNOWN
    is_safety_prompt: bool = False
    chosen_safe: bool | None = None
    rejected_safe: bool | None = None
    source: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "context", tuple(self.context))
        try:
            validate_dialog(self.context, last_role="user")
        except ChatFormatError as error:
            raise InvalidComparisonError(error.kind, f"context: {error}") from None

        for name in ("chosen", "rejected"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidComparisonError(
                    "invalid_field", f"{name} is a {type(value).__name__}, expected str"
                )
            if not value.strip():
                raise InvalidComparisonError(
                    "empty_answer", f"{name} answer is empty, expected non-blank text"
                )
        if self.chosen.strip() == self.rejected.strip():
            raise InvalidComparisonError(
                "identical_answers",
                "chosen and rejected answers are identical, expected two different answers",
            )

        if not isinstance(self.level, PreferenceLevel):
            try:
                object.__setattr__(self, "level", PreferenceLevel(self.level))
            except ValueError:
                raise InvalidComparisonError(
                    "unknown_level", f"level is {self.level!r}, expected a PreferenceLevel"
                ) from None
        if not isinstance(self.is_safety_prompt, bool):
            raise InvalidComparisonError(
                "invalid_field",
                f"is_safety_prompt is {self.is_safety_prompt!r}, expected true or false",
            )
        for name in ("chosen_safe", "rejected_safe"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise InvalidComparisonError(
                    "invalid_field", f"{name} is {value!r}, expected true, false or null"
                )
        if self.source is not None and not isinstance(self.source, str):
            raise InvalidComparisonError(
                "invalid_field", f"source is {self.source!r}, expected a string or null"
            )

    def to_json(self) -> dict[str, Any]:
        """Return the record of this comparison in the project's JSONL format."""
        return {
            "context": [{"role": m.role, "content": m.content} for m in self.context],
            "chosen": self.chosen,
            "rejected": self.rejected,
            "level": self.level.label,
            "is_safety_prompt": self.is_safety_prompt,
            "chosen_safe": self.chosen_safe,
            "rejected_safe": self.rejected_safe,
            "source": self.source,
        }


_REQUIRED_KEYS = ("context", "chosen", "rejected", "level", "is_safety_prompt")
_OPTIONAL_KEYS = ("chosen_safe", "rejected_safe", "source")


def comparison_from_json(record: Any) -> Comparison:
    """Build a Comparison from one decoded JSONL record of the project's format.

    Raises:
        InvalidComparisonError: Naming the field and what was expected.
    """
    if not isinstance(record, dict):
        raise InvalidComparisonError(
            "invalid_record", f"record is a JSON {type(record).__name__}, expected an object"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise InvalidComparisonError(
            "missing_field", f"missing field(s) {missing}; required: {list(_REQUIRED_KEYS)}"
        )
    unknown = sorted(set(record) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        raise InvalidComparisonError(
            "unknown_field",
            f"unknown field(s) {unknown}; allowed: {list(_REQUIRED_KEYS + _OPTIONAL_KEYS)}",
        )

    context_json = record["context"]
    if not isinstance(context_json, list):
        raise InvalidComparisonError(
            "invalid_field", "context must be a list of {'role': ..., 'content': ...} objects"
        )
    context = []
    for index, turn in enumerate(context_json):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            raise InvalidComparisonError(
                "invalid_field",
                f"context[{index}] is {turn!r:.80}, expected an object with exactly the keys "
                "'role' and 'content'",
            )
        try:
            context.append(Message(turn["role"], turn["content"]))
        except ChatFormatError as error:
            raise InvalidComparisonError(error.kind, f"context[{index}]: {error}") from None

    try:
        level = PreferenceLevel.parse(record["level"])
    except ValueError as error:
        raise InvalidComparisonError("unknown_level", str(error)) from None

    return Comparison(
        context=tuple(context),
        chosen=record["chosen"],
        rejected=record["rejected"],
        level=level,
        is_safety_prompt=record["is_safety_prompt"],
        chosen_safe=record.get("chosen_safe"),
        rejected_safe=record.get("rejected_safe"),
        source=record.get("source"),
    )


@dataclasses.dataclass
class ReadSummary:
    """Counts from reading one input file.

    Attributes:
        path: The input file.
        num_read: Records returned.
        skipped: Number of skipped records per broken rule (`kind`).
        first_errors: Messages of the first skipped records, for the log.
    """

    path: str = ""
    num_read: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        """Total number of skipped records."""
        return sum(self.skipped.values())

    def __str__(self) -> str:
        text = f"{self.path}: read {self.num_read} records, skipped {self.num_skipped}"
        if self.skipped:
            reasons = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.skipped.items()))
            text += f" ({reasons})"
        return text


_GZIP_MAGIC = b"\x1f\x8b"


def open_for_reading(path: str | os.PathLike):
    """Open a file in binary mode, decompressing it when it starts with the gzip magic bytes.

    The content decides rather than the name, because tensorflow-datasets renames downloads.
    """
    with open(path, "rb") as f:
        magic = f.read(len(_GZIP_MAGIC))
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_jsonl_records(
    path: str | os.PathLike,
    parse: Callable[[Any], T],
    *,
    skip_invalid: bool = False,
    summary: ReadSummary | None = None,
) -> Iterator[tuple[int, T]]:
    """Yield `(line_number, parse(record))` for every JSON line of a file.

    Errors name the file and the 1-based line number.

    Args:
        path: A JSONL file, plain or gzip-compressed.
        parse: Turns one decoded JSON value into a result; it raises InvalidComparisonError
            (or ChatFormatError) for a bad record.
        skip_invalid: Skip bad lines and count them in `summary` instead of raising.
        summary: Filled with counts while reading; a fresh one is used when None.

    Raises:
        InvalidRecordError: For the first bad line, unless `skip_invalid`.
        FileNotFoundError: When `path` does not exist.
    """
    path = pathlib.Path(path)
    if summary is None:
        summary = ReadSummary()
    summary.path = str(path)
    with open_for_reading(path) as f:
        for line_number, raw_line in _numbered_lines(f, path):
            try:
                result = _parse_line(raw_line, parse)
            except (InvalidComparisonError, ChatFormatError) as error:
                record_error = InvalidRecordError(str(path), line_number, error.kind, str(error))
                if not skip_invalid:
                    raise record_error from None
                summary.skipped[error.kind] += 1
                if len(summary.first_errors) < _MAX_KEPT_ERRORS:
                    summary.first_errors.append(str(record_error))
                log.debug("Skipping %s", record_error)
                continue
            if result is None:
                continue
            summary.num_read += 1
            yield line_number, result
    if summary.num_skipped:
        log.warning("%s; first errors: %s", summary, summary.first_errors[:3])


def _numbered_lines(f, path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
    """Yield `(line_number, line)`, turning a damaged gzip stream into an InvalidRecordError."""
    line_number = 0
    try:
        for line_number, raw_line in enumerate(f, start=1):
            yield line_number, raw_line
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise InvalidRecordError(
            str(path),
            line_number + 1,
            "invalid_gzip",
            f"gzip data is truncated or damaged ({error}); expected a complete gzip file",
        ) from error


def _parse_line(raw_line: bytes, parse: Callable[[Any], T]) -> T | None:
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidComparisonError(
            "invalid_utf8", f"line is not valid UTF-8 ({error.reason} at byte {error.start})"
        ) from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InvalidComparisonError(
            "invalid_json",
            f"invalid JSON at column {error.colno}: {error.msg}; expected one JSON object per line",
        ) from None
    return parse(record)


def read_comparisons_jsonl(
    path: str | os.PathLike,
    *,
    skip_invalid: bool = False,
    summary: ReadSummary | None = None,
) -> list[Comparison]:
    """Read comparisons in the project's JSONL format (see the module docstring).

    Args:
        path: The JSONL file, plain or gzip-compressed.
        skip_invalid: Skip bad lines and count them in `summary` (and the log) instead of
            raising.
        summary: Filled with the number of read and skipped records when given.

    Raises:
        InvalidRecordError: For the first bad line, unless `skip_invalid`; the message names
            the file, the line and what was expected.
    """
    records = read_jsonl_records(
        path, comparison_from_json, skip_invalid=skip_invalid, summary=summary
    )
    return [comparison for _, comparison in records]


def write_comparisons_jsonl(path: str | os.PathLike, comparisons: Iterable[Comparison]) -> int:
    """Write comparisons in the project's JSONL format, atomically.

    The lines go to a temporary file in the same directory, which is then renamed to `path`,
    so readers never see a partial file. A `.gz` suffix writes gzip.

    Returns:
        The number of comparisons written.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as tmp:
        try:
            if path.suffix == ".gz":
                # No file name and a zero time stamp in the header: equal data, equal bytes.
                with gzip.GzipFile(filename="", fileobj=tmp, mode="wb", mtime=0) as stream:
                    count = _write_json_lines(stream, comparisons)
            else:
                count = _write_json_lines(tmp, comparisons)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)
    return count


def _write_json_lines(stream, comparisons: Iterable[Comparison]) -> int:
    count = 0
    for comparison in comparisons:
        if not isinstance(comparison, Comparison):
            raise TypeError(f"item {count} is a {type(comparison).__name__}, expected Comparison")
        line = json.dumps(comparison.to_json(), ensure_ascii=False) + "\n"
        stream.write(line.encode("utf-8"))
        count += 1
    return count
