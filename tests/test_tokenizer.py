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


TRAIN_AND_PRINT_VOCAB = """
import json, sys
from prodclip.data import synthetic, tokenizer as tok
titles = list(synthetic.make_catalog("train", 1000, image_size=32).titles)
print(json.dumps(tok.train_tokenizer(titles, vocab_size=1024).get_vocab(), sort_keys=True))
"""


def test_wordpiece_training_gives_one_vocabulary_in_every_process():
    """Ties between equally frequent merges used to be broken by hash order, which differs per process."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    vocabs = [json.loads(subprocess.run([sys.executable, "-c", TRAIN_AND_PRINT_VOCAB], cwd=root, check=True,
                                        capture_output=True, text=True, timeout=120).stdout.splitlines()[-1])
              for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    assert [vocabs[0][t] for t in tok.SPECIAL_TOKENS] == [0, 1, 2, 3]
