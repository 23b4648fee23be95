"""Tokenizer: trained on titles, saved and re-loaded as a transformers tokenizer dir, fixed-length ids."""

import numpy as np
import pytest

from prodclip.data import tokenizer as tok

TITLES = ["Puma Men Navy Blue T-shirt", "Red striped dress with white trim", "Nike black sneaker"] * 50


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_train_save_load_roundtrip(tmp_path, kind):
    hf = tok.train_tokenizer(TITLES, kind=kind, vocab_size=200)
    a = tok.TitleTokenizer(hf, context_length=12)
    a.save(tmp_path)
    b = tok.TitleTokenizer(tok.load_hf_tokenizer(tmp_path), context_length=12)
    ids_a, ids_b = a(TITLES[:3]), b(TITLES[:3])
    np.testing.assert_array_equal(ids_a, ids_b)
    assert ids_a.shape == (3, 12) and ids_a.dtype == np.int32


def test_padding_truncation_and_eot():
    t = tok.TitleTokenizer(tok.train_tokenizer(TITLES, vocab_size=200), context_length=6)
    ids = t(["red dress", "Puma Men Navy Blue T-shirt with a very long name"])
    sep = t.hf.sep_token_id
    assert ids[0, 0] == t.hf.cls_token_id
    n = int(np.sum(ids[0] != t.pad_id))
    assert ids[0, n - 1] == sep and np.all(ids[0, n:] == t.pad_id)
    assert np.all(ids[1] != t.pad_id) and ids[1, -1] == sep  # truncated, end-of-text kept last


def test_lowercase_is_explicit():
    hf = tok.train_tokenizer(TITLES, vocab_size=200, lowercase=False)
    lower = tok.TitleTokenizer(hf, context_length=10, lowercase=True)
    cased = tok.TitleTokenizer(hf, context_length=10, lowercase=False)
    np.testing.assert_array_equal(lower(["NIKE"]), lower(["nike"]))
    assert not np.array_equal(cased(["NIKE"]), cased(["nike"]))


def test_missing_dir_is_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        tok.load_hf_tokenizer(tmp_path / "nope")
