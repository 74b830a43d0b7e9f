"""Tests of tokenizer loading, the load-time self-check and SentencePiece training."""

import shutil

import pytest
import sentencepiece as spm

from llama_rlhf.data import tokenizer as tokenizer_lib
from llama_rlhf.data.tokenizer import TokenizerError, load_tokenizer, train_sentencepiece

TEXTS = [
    "Hello world",
    "Hello  world with  double spaces ",
    " leading space",
    "Grüße aus Wien, 東京 und 🦙!",
    "[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST]",
    "literal specials: <s> </s> <unk>",
    "numbers 12345 and\ttabs\n\nnewlines",
]

TINY_CORPUS = [
    f"The llama number {i} walked {i % 7} miles to eat grass. Grüße! It said hello world."
    for i in range(200)
]


@pytest.fixture(scope="module")
def model_file(shared):
    return shared / "models/llama2-tokenizer/tokenizer.model"


@pytest.fixture(scope="module")
def processor(model_file):
    return spm.SentencePieceProcessor(model_file=str(model_file))


def test_bare_file_passes_llama2_self_check(model_file):
    tokenizer = load_tokenizer(model_file, expected_vocab_size=32000)
    # Expected values: Llama 2's tokenizer.model (32,000 pieces, BOS 1, EOS 2, no pad piece).
    assert tokenizer.vocab_size == 32000
    assert tokenizer.bos_id == 1
    assert tokenizer.eos_id == 2
    assert tokenizer.pad_id == 2
    assert tokenizer.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]


def test_encode_and_decode_match_sentencepiece(model_file, processor):
    tokenizer = load_tokenizer(model_file)
    for text in TEXTS:
        # Expected ids: sentencepiece itself, as Meta's reference Tokenizer calls it.
        assert tokenizer.encode(text) == processor.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True)) == processor.decode(
            processor.encode(text)
        )


@pytest.fixture(scope="module")
def hf_json_dir(model_file, tmp_path_factory):
    """A directory written by transformers' save_pretrained: tokenizer.json and its config."""
    transformers = pytest.importorskip("transformers")
    # from_pretrained on a folder with only tokenizer.model is the transformers 5.x path that
    # converts the full vocabulary (unlike LlamaTokenizer(vocab_file=...)).
    source = tmp_path_factory.mktemp("source")
    shutil.copy(model_file, source / "tokenizer.model")
    hf_dir = tmp_path_factory.mktemp("hf_json")
    transformers.LlamaTokenizer.from_pretrained(str(source)).save_pretrained(str(hf_dir))
    assert not (hf_dir / "tokenizer.model").exists()
    return hf_dir


def test_hf_directory_with_model_file_matches_bare_file(model_file, hf_json_dir, tmp_path):
    # A Hugging Face Llama directory as published: tokenizer.json, its config and the
    # original tokenizer.model.
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_json_dir, hf_dir)
    shutil.copy(model_file, hf_dir / "tokenizer.model")

    from_dir = load_tokenizer(hf_dir)
    from_file = load_tokenizer(model_file)
    for text in TEXTS:
        assert from_dir.encode(text, bos=True, eos=True) == from_file.encode(
            text, bos=True, eos=True
        )
    assert (from_dir.bos_id, from_dir.eos_id, from_dir.vocab_size) == (1, 2, 32000)


def test_hf_directory_without_model_file(hf_json_dir, processor):
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_json_dir))
    # transformers' own ids decide which outcome is right: the loader must accept the
    # directory exactly when its tokenizer.json reproduces SentencePiece on the probes.
    # With transformers 5.25 it does not ("Hello  world" differs).
    agrees = all(
        hf_tokenizer.encode(text, add_special_tokens=False) == processor.encode(text)
        for text in tokenizer_lib.LLAMA2_PROBES
    )
    if agrees:
        tokenizer = load_tokenizer(hf_json_dir)
        assert isinstance(tokenizer, tokenizer_lib.TransformersTokenizer)
        for text in TEXTS:
            assert tokenizer.encode(text) == processor.encode(text), text
    else:
        with pytest.raises(TokenizerError, match="put the original tokenizer.model"):
            load_tokenizer(hf_json_dir)


def test_three_token_vocabulary_is_rejected(model_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    # transformers 5.x ignores vocab_file here and builds a 3-token vocabulary.
    broken = transformers.LlamaTokenizer(vocab_file=str(model_file))
    wrapped = tokenizer_lib.TransformersTokenizer(broken, source="LlamaTokenizer(vocab_file)")
    if wrapped.encode("Hello world"):
        pytest.skip("this transformers version builds LlamaTokenizer(vocab_file=...) correctly")
    with pytest.raises(TokenizerError, match="encodes to no ids"):
        tokenizer_lib.check_tokenizer(wrapped)

    broken_dir = tmp_path / "broken"
    broken.save_pretrained(str(broken_dir))
    with pytest.raises(TokenizerError, match="encodes to no ids"):
        load_tokenizer(broken_dir)


def test_transformers_backend_loads_small_vocabulary(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "source"
    train_sentencepiece(TINY_CORPUS, source / "tokenizer", vocab_size=320)
    hf_dir = tmp_path / "hf"
    transformers.LlamaTokenizer.from_pretrained(str(source)).save_pretrained(str(hf_dir))

    tokenizer = load_tokenizer(hf_dir, expected_vocab_size=320)
    assert isinstance(tokenizer, tokenizer_lib.TransformersTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    text = "The llama walked to eat grass."
    assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True)) == text


def test_expected_vocab_size_mismatch_raises(model_file):
    with pytest.raises(TokenizerError, match="vocabulary size is 32000, expected 512"):
        load_tokenizer(model_file, expected_vocab_size=512)


def test_missing_and_invalid_paths_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing.model")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model"):
        load_tokenizer(tmp_path)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="garbage.model"):
        load_tokenizer(garbage)


class CollapsingSpaces(tokenizer_lib.SentencePieceTokenizer):
    """The Llama 2 model with runs of spaces collapsed before encoding: wrong ids, right size."""

    def _encode_text(self, text):
        while "  " in text:
            text = text.replace("  ", " ")
        return super()._encode_text(text)


def test_llama2_vocabulary_with_other_ids_raises(model_file):
    tokenizer = CollapsingSpaces(model_file)
    assert tokenizer.encode("Hello world") == [15043, 3186]
    with pytest.raises(TokenizerError, match="'Hello  world' encodes to"):
        tokenizer_lib.check_tokenizer(tokenizer)


def test_train_sentencepiece_is_deterministic(tmp_path):
    first = train_sentencepiece(TINY_CORPUS, tmp_path / "a" / "tiny", vocab_size=300)
    second = train_sentencepiece(TINY_CORPUS, tmp_path / "b" / "tiny", vocab_size=300)
    assert (tmp_path / "a/tiny.model").read_bytes() == (tmp_path / "b/tiny.model").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tiny.model"]
    assert first.encode(TINY_CORPUS[3]) == second.encode(TINY_CORPUS[3])


def test_train_sentencepiece_uses_llama_special_ids(tmp_path):
    tokenizer = train_sentencepiece(TINY_CORPUS, tmp_path / "tiny", vocab_size=300)
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "tiny.model"))
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id()) == (0, 1, 2)
    assert processor.pad_id() == -1
    assert tokenizer.vocab_size == 300
    assert tokenizer.pad_id == tokenizer.eos_id
    assert tokenizer.decode(tokenizer.encode(TINY_CORPUS[5])) == TINY_CORPUS[5]
    # Byte fallback: characters never seen in training still round-trip.
    assert tokenizer.decode(tokenizer.encode("日本 🦙")) == "日本 🦙"


def test_train_sentencepiece_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=5000"):
        train_sentencepiece(TINY_CORPUS, tmp_path / "big", vocab_size=5000)
    with pytest.raises(ValueError, match="at least one non-empty text"):
        train_sentencepiece(["", ""], tmp_path / "empty", vocab_size=300)
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(TINY_CORPUS, tmp_path / "x", vocab_size=300, model_type="word")
