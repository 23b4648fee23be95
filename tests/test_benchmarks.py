"""The throughput benchmark's JSON and arithmetic, the open_clip comparison's plumbing, the compile cache.

Each runs a micro model for a couple of steps; the numbers themselves are not checked
(they depend on the machine), only that they are measured and combined correctly.
"""

import importlib
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
tt = importlib.import_module("train_throughput")


def test_analytic_flops_by_hand():
    """One pair of the micro config, counted by hand (see encoder_flops' docstring)."""
    c = tt.micro_config()  # 16 px / patch 8 -> 4 patches + cls; width 32, 1 block, mlp 128; ctx 8; embed 32; batch 8
    w, h = 32, 128
    block = lambda t: t * (8 * w * w + 4 * w * h + 4 * t * w)
    image = 2 * 4 * (8 * 8 * 3) * w + block(5) + 2 * w * 32
    text = block(8) + 2 * w * 32
    logits = 2 * 8 * 32
    flops = tt.model_flops_per_pair(c)
    assert flops["forward"] == image + text + logits
    assert flops["train"] == 3 * (image + text + logits)


def test_analytic_flops_close_to_xla_cost_analysis():
    """XLA counts element-wise work too, so it is somewhat higher, never lower, than the matmul count."""
    c = tt.tiny_clip_config()
    c.train.batch_size = 4
    step = tt.ProdclipStep(c)
    analytic = tt.model_flops_per_pair(c)["train"] * 4
    assert analytic <= step.xla_flops <= 1.25 * analytic


def test_throughput_json_and_mfu_from_measured_peak(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--configs", "micro", "--steps", "2",
                          "--warmup", "0", "--peak-reps", "2", "--profile", str(tmp_path)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    report = json.loads(out.stdout)
    assert report["machine"]["cores"] == os.cpu_count()
    (run,) = report["runs"]
    for key in ("pairs_per_sec", "compile_s", "peak_rss_mb", "model_flops_per_sec", "matmul_peak_flops_per_sec",
                "mfu", "xla_flops_per_step", "first_step_s"):
        assert math.isfinite(run[key]) and run[key] > 0, key
    st = run["step_time_s"]
    assert st["n"] == 2 and st["min"] <= st["median"] <= st["max"]
    assert run["pairs_per_sec"] == pytest.approx(run["batch_size"] / st["median"])
    assert run["model_flops_per_sec"] == pytest.approx(run["model_flops_per_pair"] * run["pairs_per_sec"])
    assert run["mfu"] == pytest.approx(run["model_flops_per_sec"] / run["matmul_peak_flops_per_sec"])
    assert math.isfinite(run["loss_after"])
    profile = run["profile"]
    assert profile["xla_temp_mib"] > 0 and 0 < sum(profile["op_share"].values()) <= 1 + 1e-9
    assert any(kind in profile["op_share"] for kind in ("dot", "ynn_fusion", "xnn_fusion"))  # the matmuls


def test_summarize_uses_the_given_peak():
    c = tt.micro_config()
    s = tt.summarize(c, [0.5, 1.0, 2.0], peak_flops=1e9)
    assert s["pairs_per_sec"] == 8 / 1.0
    assert s["pairs_per_sec_mean"] == pytest.approx(8 * 3 / 3.5)
    assert s["mfu"] == pytest.approx(tt.model_flops_per_pair(c)["train"] * 8 / 1e9)


def test_open_clip_model_matches_prodclip_shapes():
    """The open_clip side builds the same model: parameter counts agree, but for prodclip's logit bias
    (a SigLIP parameter the softmax loss leaves unused)."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch ftfy wcwidth)")
    vs = importlib.import_module("vs_open_clip")
    c = tt.micro_config()
    torch_step = vs.OpenClipStep(c)
    jax_step = tt.ProdclipStep(c)
    assert torch_step.num_params == jax_step.num_params - 1
    times = torch_step.run(2)
    assert len(times) == 2 and np.isfinite(torch_step.last_loss)


def test_warmup_cosine_matches_optax():
    optax = pytest.importorskip("optax")
    vs = importlib.import_module("vs_open_clip")
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100, 1e-5)
    for step in (0, 5, 10, 50, 99, 100, 150):
        assert vs.warmup_cosine(step, 1e-3, 10, 100, 1e-5) == pytest.approx(float(schedule(step)), rel=1e-5, abs=1e-9)


CACHE_SCRIPT = """
import sys, jax, jax.numpy as jnp
from prodclip import compile_cache
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
compile_cache.enable(sys.argv[1], min_compile_seconds=0)
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))).block_until_ready()
print(len(hits))
"""


def test_compile_cache_second_process_hits(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = lambda: subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(tmp_path / "cache")], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()[-1]
    assert run() == "0"
    assert any((tmp_path / "cache").iterdir())
    assert int(run()) >= 1


def test_compile_cache_default_dir(monkeypatch, tmp_path):
    from prodclip import compile_cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == tmp_path / "prodclip" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_dir() == pathlib.Path.home() / ".cache" / "prodclip" / "jax"


def _random_labels(rng, n):
    sizes = {"category": 3, "colour": 2, "pattern": 2, "trim": 2, "brand": 3}
    return {name: rng.integers(0, size, n) for name, size in sizes.items()}


def test_rerank_errors_named_differences_and_ceiling_match_brute_force():
    """The error attribution and the ambiguity ceiling, against loops over every pair."""
    re = importlib.import_module("rerank_errors")
    rng = np.random.default_rng(0)
    n = 60
    labels = _random_labels(rng, n)
    brand_named = rng.random(n) < 0.5
    consistent_counts = []
    for q in range(n):
        count = 0
        for r in range(n):
            expected = [name for name in ("category", "colour", "pattern", "trim") if labels[name][q] != labels[name][r]]
            if brand_named[q] and labels["brand"][q] != labels["brand"][r]:
                expected.append("brand")
            assert re.named_differences(labels, brand_named, q, r) == expected
            count += not expected
        consistent_counts.append(count)
    assert re.ambiguity_ceiling(labels, brand_named) == pytest.approx(np.mean(1.0 / np.array(consistent_counts)))
    # All items distinct in what the titles name: every query is unambiguous.
    distinct = {name: np.arange(4) for name in ("category", "colour", "pattern", "trim", "brand")}
    assert re.ambiguity_ceiling(distinct, np.ones(4, bool)) == 1.0
    # Two items told apart only by a brand the titles leave out: each query has two candidates.
    twins = {name: np.zeros(2, np.int64) for name in ("category", "colour", "pattern", "trim")}
    twins["brand"] = np.array([0, 1])
    assert re.ambiguity_ceiling(twins, np.zeros(2, bool)) == 0.5
    assert re.named_differences(twins, np.zeros(2, bool), 0, 1) == []
    assert re.named_differences(twins, np.ones(2, bool), 0, 1) == ["brand"]


class FakeWorker:
    """Replies to `run 1` with the next of a fixed list of step times."""

    def __init__(self, times):
        self.times = list(times)

    def ask(self, command):
        assert command == "run 1"
        return {"times": [self.times.pop(0)]}


def test_warm_up_runs_until_step_time_is_stable():
    vs = importlib.import_module("vs_open_clip")
    assert not vs.is_stable([1.0, 1.0], window=3, tol=0.1)
    assert vs.is_stable([5.0, 1.0, 1.05, 0.95], window=3, tol=0.1)
    assert not vs.is_stable([1.0, 1.0, 1.3], window=3, tol=0.1)
    warm = vs.warm_up(FakeWorker([9.0, 4.0, 2.0, 1.2, 1.0, 1.0, 1.05, 7.0]), window=3, tol=0.1, max_steps=20)
    assert warm["stable"] and warm["steps"] == 7  # 1.2 is > 10% off the median of (1.2, 1.0, 1.0)
    warm = vs.warm_up(FakeWorker([9.0, 4.0, 2.0, 1.2]), window=3, tol=0.1, max_steps=4)
    assert not warm["stable"] and warm["steps"] == 4


def test_vs_open_clip_reports_ratio_of_median_step_times(tmp_path):
    """A micro run end to end: per-framework medians over all timed steps, their ratio and the per-round spread."""
    pytest.importorskip("torch")
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch ftfy wcwidth)")
    out = tmp_path / "vs.json"
    subprocess.run([sys.executable, str(BENCH / "vs_open_clip.py"), "--config", "micro", "--rounds", "2", "--steps", "3",
                    "--allow-few-steps", "--max-warmup", "3", "--out", str(out)], check=True, cwd=BENCH.parent,
                   stdout=subprocess.DEVNULL, timeout=300)
    r = json.loads(out.read_text())
    assert len(r["per_round"]) == 2 and r["steps_per_round"] == 3
    assert r["ratio_of_medians"] == pytest.approx(r["median_step_s"]["open_clip"] / r["median_step_s"]["prodclip"])
    assert r["ratio_per_round_min"] <= r["ratio_per_round_max"]
    assert r["prodclip"]["step_time_s"]["n"] == 6 and r["warmup"]["prodclip"]["steps"] >= 1
    assert len(r["load_average_before"]) == 3 and r["cpu_model"]


def test_audit_injection_ranking_metrics_and_their_mean_over_seeds():
    """precision@k per injected kind from a ranking, by hand; the mean and sd over injection draws."""
    audit_injection = importlib.import_module("audit_injection")
    ranked = ["attribute_swap", "", "random", "attribute_swap", "", "", "random", ""]
    m = audit_injection.ranking_metrics(ranked)
    assert m["all"]["k"] == 4 and m["all"]["precision_at_k"] == 0.75  # 3 of the first 4 are injected
    # swaps against the clean rows only: [swap, "", swap, "", "", ""] -> 1 of the first 2
    assert m["attribute_swap"]["k"] == 2 and m["attribute_swap"]["precision_at_k"] == 0.5
    assert m["attribute_swap"]["recall_in_top_k_all"] == 1.0  # both swaps are in the first 4 of all
    other = audit_injection.ranking_metrics(["attribute_swap", "attribute_swap", "random", "", "", "", "random", ""])
    mean = audit_injection.mean_and_sd([m, other])
    assert mean["attribute_swap"]["precision_at_k"] == pytest.approx(0.75)
    assert mean["attribute_swap"]["precision_at_k_sd"] == pytest.approx(0.25)
    assert mean["all"]["k"] == 4 and "k_sd" not in mean["all"]


def test_rerank_ceiling_lists_oracle_and_agreement_match_loops():
    """Candidate lists, R@1 after re-ordering, the label oracle and the probes' agreement, against loops."""
    rc = importlib.import_module("rerank_ceiling")
    rng = np.random.default_rng(0)
    q, g, k = 30, 40, 5
    query, gallery = rng.normal(size=(q, 8)), rng.normal(size=(g, 8))
    top, cosine = rc.candidate_lists(query, gallery, k)
    for i in range(q):
        scores = gallery @ query[i]
        assert list(top[i]) == list(np.argsort(-scores)[:k])
        np.testing.assert_allclose(cosine[i], scores[top[i]], rtol=1e-12)
    keys = rng.integers(0, 6, g)
    query_keys = rng.integers(0, 6, q)
    hits = keys[top] == query_keys[:, None]
    assert rc.r1_after(cosine, hits) == pytest.approx(hits[:, 0].mean())  # the two-tower order
    # Ties keep the given order; a score that favours the last candidate picks it.
    last = np.zeros((q, k)); last[:, -1] = 1.0
    assert rc.r1_after(np.zeros((q, k)), hits) == pytest.approx(hits[:, 0].mean())
    assert rc.r1_after(last, hits) == pytest.approx(hits[:, -1].mean())
    colour_q, colour_g = rng.integers(0, 3, q), rng.integers(0, 3, g)
    kind_q, kind_g = rng.integers(0, 2, q), rng.integers(0, 2, g)
    expected = []
    for i in range(q):
        consistent = [j for j in top[i] if colour_g[j] == colour_q[i] and kind_g[j] == kind_q[i]]
        first = consistent[0] if consistent else top[i][0]
        expected.append(keys[first] == query_keys[i])
    assert rc.oracle_r1(top, hits, [colour_q, kind_q], [colour_g, kind_g]) == pytest.approx(np.mean(expected))
    photo, title = rng.dirichlet(np.ones(3), g), rng.dirichlet(np.ones(3), q)
    agreement = rc.label_agreement(photo, title, top)
    for i in range(q):
        for c in range(k):
            assert agreement[i, c] == pytest.approx(np.log(sum(photo[top[i, c], v] * title[i, v] for v in range(3)) + 1e-6))


def test_rerank_ceiling_listwise_loss_folds_and_lists():
    rc = importlib.import_module("rerank_ceiling")
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(4, 3))
    hits = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 1]], bool)
    expected = np.mean([-np.log(np.exp(s)[h].sum() / np.exp(s).sum()) for s, h in zip(scores, hits)])
    assert float(rc.listwise_loss(scores, hits)) == pytest.approx(expected, rel=1e-5)
    titles = ["a red shirt", "blue jeans", "a red shirt", "green cap"] * 10
    folds = rc.title_folds(titles)
    assert set(folds) <= {0, 1} and folds[0] == folds[2] and list(folds) == list(rc.title_folds(titles))
    n = 60
    emb = rng.normal(size=(n, 4)); emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = np.arange(n) % 20
    folds = np.arange(n) % 2
    query, candidates, cosine, list_hits = rc.train_lists(emb, emb, keys, folds, 3, 10)
    assert len(query) == n and len(set(query)) == n  # 30 rows a fold: galleries of 10, no remainder
    for qi, cand, h in zip(query, candidates, list_hits):
        assert (folds[cand] == folds[qi]).all()  # galleries within the query's own fold
        assert list(h) == list(keys[cand] == keys[qi])


def test_rerank_ceiling_listwise_reranker_learns_a_feature_the_cosine_lacks():
    """On lists where the cosine cannot tell the positive apart but the locked features can (the photo's
    one-hot colour equals the title's), the trained re-ranker beats the two-tower order; with features
    that carry nothing it stays near it."""
    rc = importlib.import_module("rerank_ceiling")
    rng = np.random.default_rng(2)

    def lists(n, informative):
        k, colours = 4, 4
        colour = rng.integers(0, colours, (n, k))
        positive = rng.integers(0, k, n)
        text_colour = colour[np.arange(n), positive]
        colour[np.arange(n)[:, None], np.arange(k)] = np.where(
            np.arange(k) == positive[:, None], colour, (text_colour[:, None] + 1 + rng.integers(0, colours - 1, (n, k)))
            % colours)
        image_features = np.eye(colours)[colour.reshape(-1)] if informative else rng.normal(size=(n * k, colours))
        return {"image_features": image_features.astype(np.float32),
                "text_features": np.eye(colours)[text_colour].astype(np.float32),
                "image_emb": np.zeros((n * k, 2), np.float32), "text_emb": np.zeros((n, 2), np.float32),
                "query": np.arange(n), "candidates": np.arange(n * k).reshape(n, k),
                "cosine": rng.normal(scale=0.01, size=(n, k)).astype(np.float32),
                "hits": np.arange(k)[None] == positive[:, None]}

    train, val = lists(2048, True), lists(512, True)
    two_tower = rc.r1_after(val["cosine"], val["hits"])
    learnt = rc.fit_listwise(train, val, 10.0, epochs=5, hidden=16, lr=1e-2)
    assert len(learnt) == 5 and learnt[-1] > 0.75 and learnt[-1] > two_tower + 0.4
    noise_train, noise_val = lists(2048, False), lists(512, False)
    noise = rc.fit_listwise(noise_train, noise_val, 10.0, epochs=3, hidden=16, lr=1e-2)
    assert abs(noise[-1] - rc.r1_after(noise_val["cosine"], noise_val["hits"])) < 0.15
