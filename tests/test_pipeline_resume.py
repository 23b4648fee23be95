"""The grain pipeline: exact resume from a mid-epoch state, disjoint per-process shards that cover
the split, and worker processes that give the same stream as the in-process pipeline."""

import numpy as np
import pytest

from prodclip import config as config_lib
from prodclip.data import pipeline, synthetic
from prodclip.data import tokenizer as tok

N = 48


@pytest.fixture(scope="module")
def setup():
    source = synthetic.make_catalog("train", N, image_size=32)
    tokenizer = tok.TitleTokenizer(tok.train_tokenizer(source.titles, vocab_size=200), context_length=8)
    config = config_lib.base_config()
    config.data.image_size = 32
    config.train.batch_size = 8
    return source, tokenizer, config


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_resume_from_mid_epoch_state_yields_the_remaining_sequence(setup):
    source, tokenizer, config = setup
    reference = pipeline.train_iterator(source, tokenizer, config)
    expected = _take(reference, 9)  # 6 batches per epoch: crosses into the second epoch
    first = pipeline.train_iterator(source, tokenizer, config)
    _take(first, 4)
    state = first.get_state()
    resumed = pipeline.train_iterator(source, tokenizer, config, state=state)
    _assert_same(_take(resumed, 5), expected[4:])
    # each epoch is a permutation of the whole split, and the second differs from the first
    epoch1 = np.concatenate([b["ids"] for b in expected[:6]])
    assert sorted(epoch1) == sorted(source.ids)
    assert not np.array_equal(epoch1[:24], np.concatenate([b["ids"] for b in expected[6:9]]))


def test_process_shards_are_disjoint_and_cover_the_split(setup):
    source, tokenizer, config = setup
    shards = []
    for p in range(3):
        # per process batch = 8 // 2 would not divide 3 processes: use a batch the processes divide
        with config.unlocked():
            config.train.batch_size = 12
        it = pipeline.train_iterator(source, tokenizer, config, process_index=p, process_count=3)
        shards.append(np.concatenate([b["ids"] for b in _take(it, N // 12)]))  # one epoch per process
    for a in range(3):
        assert len(shards[a]) == N // 3
        for b in range(a + 1, 3):
            assert not set(shards[a]) & set(shards[b])
    assert sorted(np.concatenate(shards)) == sorted(source.ids)
    with config.unlocked():
        config.train.batch_size = 8
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        pipeline.train_dataset(source, tokenizer, config, process_count=3)


def test_worker_processes_give_the_same_stream_and_resume(setup):
    source, tokenizer, config = setup
    expected = _take(pipeline.train_iterator(source, tokenizer, config), 5)
    config.data.num_workers = 2
    try:
        it = pipeline.train_iterator(source, tokenizer, config)
        got = _take(it, 3)
        state = it.get_state()
        it.close()
        resumed = pipeline.train_iterator(source, tokenizer, config, state=state)
        got += _take(resumed, 2)
        resumed.close()
    finally:
        config.data.num_workers = 0
    _assert_same(got, expected)


def test_title_complete_marks_exactly_the_titles_that_word_dropout_shortened(setup):
    source, tokenizer, config = setup
    tokenizer = tok.TitleTokenizer(tokenizer.hf, context_length=32)  # no truncation: full titles compare
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.title_dropout_prob, config.data.title_keep_prob = 0.5, 0.5
    full = {int(i): tokenizer([t])[0] for i, t in zip(source.ids, source.titles)}
    batches = _take(pipeline.train_iterator(source, tokenizer, config), 6)
    complete = np.concatenate([b["title_complete"] for b in batches])
    same = np.concatenate([[np.array_equal(row, full[int(i)]) for i, row in zip(b["ids"], b["token_ids"])]
                           for b in batches])
    np.testing.assert_array_equal(complete, same)
    assert 0 < complete.sum() < len(complete)  # both kinds occur at dropout 0.5
    eval_batch = next(iter(pipeline.eval_batches(source, tokenizer, config)))
    assert eval_batch["title_complete"].all()
