"""Tests of the SFT stage: dialogue files, the loss mask, a short run, resume and reuse."""

import gzip
import json

import jax
import numpy as np
import pytest

from configs import sft as sft_configs
from llama_rlhf import sft
from llama_rlhf.data.batching import pack_sft
from llama_rlhf.data.chat import Message, encode_for_training
from llama_rlhf.data.preferences import InvalidRecordError
from llama_rlhf.data.tokenizer import load_tokenizer, train_sentencepiece
from llama_rlhf.model import Llama, get_variant, init_params
from llama_rlhf.training import load_model, read_metrics, save_model

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                  num_kv_heads=1, max_seq_len=128)


def make_dialogues(count):
    """Small arithmetic dialogues; some have a system message and a second exchange."""
    dialogues = []
    for i in range(count):
        a, b = i % 7, (3 * i) % 5
        messages = []
        if i % 3 == 0:
            messages.append(Message("system", "Answer with one sentence."))
        messages += [Message("user", f"What is {a} plus {b}?"),
                     Message("assistant", f"{a} plus {b} is {a + b}.")]
        if i % 2:
            messages += [Message("user", "And times two?"),
                         Message("assistant", f"That is {2 * (a + b)}.")]
        dialogues.append(messages)
    return dialogues


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A 300-piece SentencePiece model trained on the test dialogues."""
    folder = tmp_path_factory.mktemp("tokenizer")
    texts = [message.content for dialogue in make_dialogues(40) for message in dialogue]
    texts += ["[INST] <<SYS>> <</SYS>> [/INST]"] * 4
    train_sentencepiece(texts, folder / "sp", vocab_size=300)
    return folder / "sp.model"


@pytest.fixture(scope="module")
def small_tokenizer(tokenizer_file):
    return load_tokenizer(tokenizer_file)


def small_config(tokenizer_path, **changes):
    config = sft_configs.get_config("tiny,smoke")
    with config.unlocked():
        config.init_from = "random:tiny"
        config.model_overrides = dict(TINY_MODEL, vocab_size=300)
        config.data.tokenizer = str(tokenizer_path)
        config.data.hh_rlhf_path = ""
        config.data.eval_fraction = 0.0
        config.data.limit = 0
        config.data.max_length = 64
        config.num_devices = 1
        config.batch_size = 4
        config.loop.log_every = 1
        config.loop.eval_every = 0
        for name, value in changes.items():
            target = config
            *parents, leaf = name.split(".")
            for parent in parents:
                target = target[parent]
            target[leaf] = value
    return config


# ---------------------------------------------------------------------------------------------
# Dialogue files.


def test_dialogue_jsonl_round_trip(tmp_path):
    dialogues = make_dialogues(5)
    path = tmp_path / "dialogues.jsonl"
    assert sft.write_dialogues_jsonl(path, dialogues) == 5
    assert sft.read_dialogues_jsonl(path) == dialogues
    gz_path = tmp_path / "dialogues.jsonl.gz"
    with gzip.open(gz_path, "wt") as file:
        file.write(path.read_text())
    assert sft.read_dialogues_jsonl(gz_path) == dialogues


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"turns": []}), "expected an object with a 'messages' list"),
        (json.dumps({"messages": "hi"}), "expected a list"),
        (json.dumps({"messages": [{"role": "user"}]}), "exactly the keys 'role' and 'content'"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "expected one of"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "expected 'assistant'"),
        (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), "expected 'user'"),
    ],
)
def test_read_dialogues_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(sft.dialogue_to_json(make_dialogues(1)[0]))
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(InvalidRecordError, match=message) as error:
        sft.read_dialogues_jsonl(path)
    assert str(error.value).startswith(f"{path}:2: ")


def test_read_dialogues_skip_invalid(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(sft.dialogue_to_json(make_dialogues(1)[0]))
    path.write_text(good + "\n{broken\n" + good + "\n")
    assert len(sft.read_dialogues_jsonl(path, skip_invalid=True)) == 2


# ---------------------------------------------------------------------------------------------
# The loss mask.


def test_sft_loss_mask_literal_arrays(tmp_path, shared):
    tokenizer = load_tokenizer(shared / "models" / "llama2-tokenizer" / "tokenizer.model")
    dialogue = [Message("user", "Hi"), Message("assistant", "Hello"),
                Message("user", "Bye"), Message("assistant", "Ciao")]
    path = tmp_path / "one.jsonl"
    sft.write_dialogues_jsonl(path, [dialogue])
    [(ids, loss_mask)] = sft.load_sft_examples(path, tokenizer)

    # Expected ids: Llama 2's pieces of Meta's format, BOS "[INST] Hi [/INST] Hello " EOS
    # BOS "[INST] Bye [/INST] Ciao " EOS:
    # <s> ▁[ INST ] ▁Hi ▁[ / INST ] ▁Hello ▁ </s> <s> ▁[ INST ] ▁By e ▁[ / INST ] ▁C iao ▁ </s>
    assert ids == [1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962, 15043, 29871, 2,
                   1, 518, 25580, 29962, 2648, 29872, 518, 29914, 25580, 29962, 315, 29653,
                   29871, 2]
    # Targets: each answer and its EOS; every prompt token is 0.
    assert loss_mask == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1,
                         0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]

    batch = pack_sft([(ids, loss_mask)], 32, tokenizer.pad_id)
    np.testing.assert_array_equal(
        batch["loss_mask"][0].astype(int),
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1,
         0, 0, 0, 0, 0, 0])

    # The stage's loss is the mean cross-entropy of exactly those 7 targets, each predicted
    # from the previous position. A plain loop over the logits is the reference.
    config = get_variant("tiny", **TINY_MODEL)
    model = Llama(config)
    params = init_params(config, jax.random.key(0))
    loss, metrics = jax.jit(sft.make_loss_fn(model))(params, batch, jax.random.key(0))
    logits, _ = jax.jit(model.apply)({"params": params}, batch["tokens"], mask=batch["mask"])
    logits = np.asarray(logits[0], np.float64)
    targets = [9, 10, 11, 22, 23, 24, 25]
    expected = 0.0
    for t in targets:
        row = logits[t - 1]
        log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
        expected -= row[ids[t]] - log_z
    expected /= len(targets)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["loss"][1]) == len(targets)


def test_keep_trainable_drops_examples_cut_before_their_answer():
    examples = [([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]), ([1, 2, 3], [0, 1, 1])]
    # Truncated to 3 tokens, the first example keeps no target and is dropped.
    assert sft.keep_trainable(examples, 3, True, "training") == [examples[1]]
    with pytest.raises(ValueError, match="example 0 has 5 tokens"):
        sft.keep_trainable(examples, 3, False, "training")


# ---------------------------------------------------------------------------------------------
# Runs.


def test_sft_two_step_run_writes_outputs(tmp_path, tokenizer_file):
    train_file = tmp_path / "train.jsonl"
    eval_file = tmp_path / "eval.jsonl"
    sft.write_dialogues_jsonl(train_file, make_dialogues(12))
    sft.write_dialogues_jsonl(eval_file, make_dialogues(20)[12:])
    config = small_config(tokenizer_file, num_steps=2,
                          **{"data.train_files": str(train_file),
                             "data.eval_files": str(eval_file)})
    workdir = tmp_path / "run"
    result = sft.train_and_evaluate(config, str(workdir))

    assert result["steps"] == 2
    assert result["train_examples"] == 12
    assert result["eval_examples"] == 8
    assert np.isfinite(result["train/loss"])
    assert np.isfinite(result["eval/loss"])
    assert result["eval/perplexity"] == pytest.approx(np.exp(result["eval/loss"]))
    assert json.loads((workdir / "config.json").read_text())["num_steps"] == 2
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert "perf/mfu" in records[1]
    assert any("eval/loss" in r for r in records)
    loaded = load_model(result["model_dir"])
    assert loaded.head == "lm"
    assert loaded.metadata["stage"] == "sft"
    assert loaded.config.hidden_size == 32


class Interrupted(Exception):
    pass


def test_sft_resume_matches_uninterrupted_run(tmp_path, small_tokenizer):
    examples = [encode_for_training(small_tokenizer, d) for d in make_dialogues(12)]
    config = small_config("unused", num_steps=5, **{"loop.checkpoint_every": 2})

    reference = sft.train_on_examples(config, tmp_path / "reference", examples,
                                      tokenizer=small_tokenizer)

    def kill_at_step_3(done):
        if done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        sft.train_on_examples(config, tmp_path / "resumed", examples, tokenizer=small_tokenizer,
                              on_step=kill_at_step_3)
    resumed = sft.train_on_examples(config, tmp_path / "resumed", examples,
                                    tokenizer=small_tokenizer)
    assert resumed.steps == 5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 jax.device_get(resumed.params), jax.device_get(reference.params))
    exported = load_model(tmp_path / "reference" / "model")
    jax.tree.map(np.testing.assert_array_equal, exported.params,
                 jax.device_get(reference.params))

    # Rerunning a finished run trains no further and exports the same model.
    again = sft.train_on_examples(config, tmp_path / "resumed", examples,
                                  tokenizer=small_tokenizer)
    assert again.steps == 5
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.params),
                 jax.device_get(resumed.params))

    # Other examples in the same workdir are refused rather than silently mixed.
    with pytest.raises(ValueError, match="same config"):
        sft.train_on_examples(config, tmp_path / "resumed", examples[::-1],
                              tokenizer=small_tokenizer)


def test_train_on_examples_saved_model_start(tmp_path, small_tokenizer):
    # Ghost Attention style: only the last answer of each dialogue is a target.
    examples = [encode_for_training(small_tokenizer, d, learn="last") for d in make_dialogues(8)]
    model_config = get_variant("tiny", **TINY_MODEL, vocab_size=300)
    start_params = init_params(model_config, jax.random.key(5))
    save_model(tmp_path / "start", model_config, start_params, head="lm")

    # With learning rate 0 nothing moves, so the result equals the model it started from
    # (and not a fresh initialization from config.init_from).
    config = small_config("unused", num_steps=1,
                          **{"optimizer.learning_rate": 0.0, "data.max_length": 128})
    result = sft.train_on_examples(config, tmp_path / "run", examples,
                                   init_from=str(tmp_path / "start"), tokenizer=small_tokenizer,
                                   metadata={"source": "ghost attention"})
    assert result.metrics["train/target_tokens"] > 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.params), start_params)
    exported = load_model(result.model_dir)
    assert exported.metadata["source"] == "ghost attention"
    assert exported.metadata["init_from"] == str(tmp_path / "start")


def test_train_on_examples_rejects_ids_outside_vocabulary(tmp_path, small_tokenizer):
    config = small_config("unused", num_steps=1)
    with pytest.raises(ValueError, match="token id 300"):
        sft.train_on_examples(config, tmp_path / "run", [([1, 300, 2], [0, 1, 1])] * 4,
                              tokenizer=small_tokenizer)
