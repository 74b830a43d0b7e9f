"""Llama tokenizers: loading, a load-time self-check, and training small SentencePiece models.

A `Tokenizer` turns text into token ids and back, with BOS and EOS added only on request, as
Meta's reference `Tokenizer.encode(text, bos, eos)` does. `load_tokenizer` accepts a bare
SentencePiece `tokenizer.model` or a Hugging Face model directory, and checks the result before
returning it, because a broken tokenizer otherwise fails silently. For example, transformers
5.x builds `LlamaTokenizer(vocab_file=...)` with a 3-token vocabulary that encodes every text to
an empty list.

Backends:
  * SentencePiece, used for a `*.model` file and for any directory that contains
    `tokenizer.model`. This is the tokenizer Meta trained and evaluated Llama 2 with.
  * transformers, used for a directory with only `tokenizer.json`/`tokenizer_config.json`.
    With transformers 5.25 the Llama 2 `tokenizer.json` converted from `tokenizer.model`
    does not reproduce SentencePiece on runs of spaces or on a leading space
    ("Hello  world" gives [15043, 259, 11526] instead of [15043, 29871, 3186]). The
    self-check probes exactly that, so such a directory is rejected for the Llama 2 vocabulary
    instead of silently producing other ids.
"""

from __future__ import annotations

import abc
import io
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

log = logging.getLogger(__name__)

LLAMA2_VOCAB_SIZE = 32000
LLAMA2_BOS_ID = 1
LLAMA2_EOS_ID = 2

# Ids from Meta's Llama 2 `tokenizer.model` with sentencepiece 0.2.3; they pin the dummy-prefix
# and whitespace-splitting behaviour that the chat format relies on.
LLAMA2_PROBES: dict[str, list[int]] = {
    "Hello world": [15043, 3186],
    "Hello  world": [15043, 29871, 3186],
    " Hello world": [29871, 15043, 3186],
}

_SELF_CHECK_TEXT = "Hello world"


class TokenizerError(ValueError):
    """A tokenizer file or object that fails the load-time self-check."""


class Tokenizer(abc.ABC):
    """Text to token ids and back, with explicit BOS and EOS.

    Llama 2 has no padding piece, so `pad_id` defaults to `eos_id`. Batches therefore carry
    explicit masks, and no code may tell padding from a real EOS by its id.

    Attributes:
        source: The file or directory the tokenizer was loaded from, for messages.
    """

    def __init__(self, *, source: str, pad_id: int | None = None):
        self.source = source
        self._pad_id = pad_id

    @abc.abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """Encode text without any special token."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; BOS, EOS and other control tokens are dropped."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """Id of the end-of-sequence token."""

    @property
    def pad_id(self) -> int:
        """Id written into padded positions; `eos_id` unless the model defines a pad piece."""
        return self.eos_id if self._pad_id is None else self._pad_id

    @abc.abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """Vocabulary piece of one id, for debugging output."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode text to ids, optionally with BOS first and EOS last.

        Special-token strings inside `text` (such as "</s>") are encoded as plain text,
        never as the special token.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._encode_text(text)
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


class SentencePieceTokenizer(Tokenizer):
    """Tokenizer backed by a SentencePiece model, as in Meta's reference code."""

    def __init__(self, model_file: str | os.PathLike, *, pad_id: int | None = None):
        model_file = pathlib.Path(model_file)
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(model_file))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(
                f"cannot load {model_file} as a SentencePiece model: {error}"
            ) from error
        if pad_id is None and processor.pad_id() >= 0:
            pad_id = processor.pad_id()
        super().__init__(source=str(model_file), pad_id=pad_id)
        self._processor = processor

    def _encode_text(self, text: str) -> list[int]:
        return list(self._processor.EncodeAsIds(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.DecodeIds([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    def id_to_piece(self, token_id: int) -> str:
        return self._processor.IdToPiece(int(token_id))


class TransformersTokenizer(Tokenizer):
    """Tokenizer backed by a Hugging Face `transformers` tokenizer object."""

    def __init__(self, hf_tokenizer, *, source: str, pad_id: int | None = None):
        super().__init__(source=source, pad_id=pad_id)
        self._hf = hf_tokenizer

    def _encode_text(self, text: str) -> list[int]:
        # split_special_tokens=True keeps "<s>" in user text from turning into a real BOS.
        return list(self._hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self._hf)

    @property
    def bos_id(self) -> int:
        return self._hf.bos_token_id

    @property
    def eos_id(self) -> int:
        return self._hf.eos_token_id

    def id_to_piece(self, token_id: int) -> str:
        return self._hf.convert_ids_to_tokens(int(token_id))


def check_tokenizer(tokenizer: Tokenizer, *, expected_vocab_size: int | None = None) -> None:
    """Raise TokenizerError unless the tokenizer encodes text as a usable Llama tokenizer.

    Every tokenizer must have BOS and EOS ids inside its vocabulary, distinct from each other,
    and must encode a non-empty text to a non-empty list of in-vocabulary ids. A tokenizer with
    the Llama 2 vocabulary size (32,000) is taken to be Llama 2's: it must also have BOS 1 and
    EOS 2 and reproduce the ids of Meta's SentencePiece model for the strings in
    `LLAMA2_PROBES`. Other vocabularies of that size, such as Mistral 7B's, fail this check.

    Args:
        tokenizer: The tokenizer to check.
        expected_vocab_size: When given, the exact vocabulary size required.
    """
    where = tokenizer.source
    vocab_size = tokenizer.vocab_size
    if expected_vocab_size is not None and vocab_size != expected_vocab_size:
        raise TokenizerError(
            f"{where}: vocabulary size is {vocab_size}, expected {expected_vocab_size}"
        )
    for name in ("bos_id", "eos_id", "pad_id"):
        token_id = getattr(tokenizer, name)
        if token_id is None or not 0 <= token_id < vocab_size:
            raise TokenizerError(
                f"{where}: {name} is {token_id}, expected an id in [0, {vocab_size})"
            )
    if tokenizer.bos_id == tokenizer.eos_id:
        raise TokenizerError(f"{where}: BOS and EOS share the id {tokenizer.bos_id}")

    ids = tokenizer.encode(_SELF_CHECK_TEXT)
    if not ids:
        raise TokenizerError(
            f"{where}: {_SELF_CHECK_TEXT!r} encodes to no ids at all (vocabulary size "
            f"{vocab_size}). With transformers 5.x, LlamaTokenizer(vocab_file=...) builds such "
            "an empty tokenizer; load the tokenizer.model file or use "
            "LlamaTokenizer.from_pretrained(directory) instead."
        )
    out_of_range = [i for i in ids if not 0 <= i < vocab_size]
    if out_of_range:
        raise TokenizerError(
            f"{where}: {_SELF_CHECK_TEXT!r} encodes to ids {out_of_range} outside the "
            f"vocabulary of size {vocab_size}"
        )

    if vocab_size == LLAMA2_VOCAB_SIZE:
        _check_llama2(tokenizer)


def _check_llama2(tokenizer: Tokenizer) -> None:
    where = tokenizer.source
    if (tokenizer.bos_id, tokenizer.eos_id) != (LLAMA2_BOS_ID, LLAMA2_EOS_ID):
        raise TokenizerError(
            f"{where}: a 32,000-token vocabulary has BOS {tokenizer.bos_id} and EOS "
            f"{tokenizer.eos_id}, expected Llama 2's BOS {LLAMA2_BOS_ID} and EOS {LLAMA2_EOS_ID}"
        )
    for text, expected in LLAMA2_PROBES.items():
        ids = tokenizer.encode(text)
        if ids != expected:
            raise TokenizerError(
                f"{where}: {text!r} encodes to {ids}, but Llama 2's SentencePiece model gives "
                f"{expected}. A tokenizer.json converted by transformers 5.x splits runs of "
                "spaces this way. If that is the case here, put the original tokenizer.model "
                "into the directory, because it is preferred over tokenizer.json."
            )


def load_tokenizer(
    path: str | os.PathLike,
    *,
    expected_vocab_size: int | None = None,
    pad_id: int | None = None,
) -> Tokenizer:
    """Load and self-check a tokenizer from a SentencePiece file or a Hugging Face directory.

    A directory that contains `tokenizer.model` is read with SentencePiece, and other
    directories with `transformers.AutoTokenizer` from local files only.

    NOTE: with SentencePiece, tokens that a directory's tokenizer.json adds beyond
    tokenizer.model (such as a "<pad>" appended by a fine-tuning recipe) are not loaded.

    Args:
        path: A SentencePiece model file, or a Hugging Face model or tokenizer directory.
        expected_vocab_size: When given, the exact vocabulary size required, for example the
            model's embedding rows.
        pad_id: Id for padded positions; defaults to the model's pad piece, else EOS.

    Returns:
        The checked tokenizer.

    Raises:
        FileNotFoundError: When `path` or the tokenizer files in the directory are missing.
        TokenizerError: When the files cannot be loaded or fail `check_tokenizer`.
    """
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")

    if path.is_file():
        tokenizer: Tokenizer = SentencePieceTokenizer(path, pad_id=pad_id)
    elif (path / "tokenizer.model").is_file():
        tokenizer = SentencePieceTokenizer(path / "tokenizer.model", pad_id=pad_id)
    elif (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = _load_transformers_tokenizer(path, pad_id=pad_id)
    else:
        raise FileNotFoundError(
            f"{path} contains neither tokenizer.model nor tokenizer.json/tokenizer_config.json"
        )

    check_tokenizer(tokenizer, expected_vocab_size=expected_vocab_size)
    log.info("Loaded %r", tokenizer)
    return tokenizer


def _load_transformers_tokenizer(directory: pathlib.Path, *, pad_id: int | None) -> Tokenizer:
    import transformers  # Imported here because it takes seconds and most callers never need it.

    try:
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True
        )
    except (OSError, ValueError) as error:
        raise TokenizerError(
            f"transformers failed to load a tokenizer from {directory}: {error}"
        ) from error
    return TransformersTokenizer(hf_tokenizer, source=str(directory), pad_id=pad_id)


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix_path: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 1.0,
    max_sentence_bytes: int = 1 << 16,
) -> Tokenizer:
    """Train a small SentencePiece model with Llama's special ids and settings, then load it.

    The trainer settings follow those stored in Llama 2's `tokenizer.model`: UNK 0, BOS 1,
    EOS 2, no pad piece, identity normalization, a dummy prefix, no whitespace collapsing,
    digits split, whitespace-only pieces allowed. Unlike Llama 2 (character coverage 0.99995),
    every character of the corpus gets a piece by default. Training uses one thread and keeps
    the input order, so the same texts give the same model file.

    Args:
        texts: Training sentences, one string each. The trainer skips sentences longer than
            `max_sentence_bytes` UTF-8 bytes.
        model_prefix_path: Output path without extension. The model is written to
            `<prefix>.model` through a temporary name and then renamed.
        vocab_size: Number of pieces. With `byte_fallback` it must exceed 259 (3 special
            pieces and 256 byte pieces) by enough for the corpus' characters.
        model_type: "bpe" (as Llama) or "unigram".
        byte_fallback: Encode characters outside the vocabulary as UTF-8 byte pieces
            instead of UNK.
        character_coverage: Fraction of the corpus' characters that get their own piece. The
            rarest characters beyond it fall back to byte pieces (or UNK without
            `byte_fallback`).
        max_sentence_bytes: Length limit of one training sentence in UTF-8 bytes.

    Returns:
        The loaded and checked tokenizer.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type is {model_type!r}, expected 'bpe' or 'unigram'")
    prefix = pathlib.Path(model_prefix_path).expanduser()
    prefix.parent.mkdir(parents=True, exist_ok=True)

    sentences = [text for text in texts if text]
    if not sentences:
        raise ValueError("train_sentencepiece needs at least one non-empty text")

    # The model goes to memory first: written by the trainer itself, it would record the
    # (temporary) output path and differ from run to run.
    model_bytes = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(sentences),
            model_writer=model_bytes,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=max_sentence_bytes,
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=0,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(
            f"SentencePiece training for {prefix} with vocab_size={vocab_size} failed: {error}"
        ) from error

    model_file = pathlib.Path(f"{prefix}.model")
    _write_bytes_atomically(model_file, model_bytes.getvalue())
    return load_tokenizer(model_file, expected_vocab_size=vocab_size)


def _write_bytes_atomically(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, then rename it to `path`."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)
