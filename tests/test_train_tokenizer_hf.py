"""Hugging Face tokenizers from a local folder, checked against transformers."""

import json

import numpy as np
import pytest
from mechinterp.train.tokenizer import HFTokenizer, WordTokenizer, load_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SENTENCES = ["the cat sat on the mat", "the dog ate the bone", "a cat and a dog met",
             "héllo wörld, the cat said"]
PROBES = ["the cat sat", "a dog ate the mat", "zebra ünïcode 42!", "  two  spaces", ""]
SPECIALS = ["<pad>", "<s>", "</s>"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A byte-level BPE trained on four sentences, saved as a transformers folder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"pad_token": "<pad>", "bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>"}))
    return path


def test_encodings_match_transformers(folder):
    ours = HFTokenizer.load(folder)
    reference = PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert ours.vocab_size == len(reference) > 256 + len(SPECIALS)  # merges were learned
    assert (ours.pad_id, ours.bos_id, ours.eos_id) == (
        reference.pad_token_id, reference.bos_token_id, reference.eos_token_id) == (0, 1, 2)
    assert len(ours.encode("the cat")) < len("the cat")  # merged, not byte by byte
    for text in SENTENCES + PROBES:
        for special in (False, True):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids.dtype == np.int32
            assert ids.tolist() == reference.encode(text, add_special_tokens=special), text
        with_specials = ours.encode(text, add_special_tokens=True)
        assert ours.decode(with_specials) == reference.decode(with_specials.tolist())
    words = ["the", "cat", "sat"]
    assert ours.encode(words).tolist() == reference(
        words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    vocab = reference.convert_ids_to_tokens(list(range(len(reference))))
    assert list(ours.vocab) == vocab and ours.id("Ġcat") == reference.convert_tokens_to_ids(
        "Ġcat")


def test_padding_decode_save_and_errors(folder, tmp_path):
    ours = HFTokenizer.load(folder)
    ids = ours.encode("the cat", add_special_tokens=True).tolist()
    assert ours.decode(ids + [ours.pad_id] * 3) == "<s>the cat</s>"
    assert ours.decode(ids + [ours.pad_id], skip_pad=False) == "<s>the cat</s><pad>"
    size = ours.vocab_size
    with pytest.raises(ValueError, match=rf"id {size} is outside the vocabulary \(size {size}\)"):
        ours.decode([3, size])
    with pytest.raises(KeyError, match="token 'Ġcta' is not in the vocabulary; close:"):
        ours.id("Ġcta")

    ours.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert isinstance(again, HFTokenizer) and again == ours
    assert PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "copy")).pad_token_id == 0
    words = WordTokenizer(["a", "b"])
    words.save(tmp_path / "vocab.json")
    assert load_tokenizer(tmp_path / "vocab.json") == words

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "vocab.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in .*empty \(it holds "
                                                r"\['vocab.txt'\]\); a Hugging Face"):
        HFTokenizer.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        HFTokenizer.load(tmp_path / "missing")


def test_a_folder_without_special_tokens_has_none(folder, tmp_path):
    (tmp_path / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    bare = HFTokenizer.load(tmp_path)
    assert (bare.pad_id, bare.bos_id, bare.eos_id) == (None, None, None)
    assert bare.decode([0, 1]) == "<pad><s>"  # nothing is padding, nothing dropped
