"""What re-ranking the two-tower top k can gain on val for a run with locked towers, and what their features give it.

    python benchmarks/rerank_ceiling.py runs/pretrained/qb [runs/...] [--k 16] \
        [--labels articleType,baseColour,gender] [--epochs 4] [--out F]

For each finished run with both towers locked and their train caches (configs/myntra_pretrained.py),
on val text->image (each row's title a query, matched as evaluation matches: same id or title):

1. Oracle. Each query's two-tower top k re-ordered so that photos whose labels equal the query
   item's come first (for each label alone and for all together), two-tower order within: the R@1
   a re-ranker that knew those labels would reach. The labels are catalog columns, not read from
   titles, so this is an upper bound.
2. Probes. A logistic regression per label on the locked towers' cached train features, one on the
   photo side and one on the title side, scored on val; each query's top k re-ordered by
   logit_scale * cosine + w * sum over labels of log sum_v p_photo(v) p_title(v), for each w. The
   best w is chosen on val itself, so the best row overstates what the probes add.
3. Listwise. The run's heads trained again out of fold: train split in two halves by title, and
   the heads that embed each half trained on the other (the run's optimizer and loss, --fold-steps
   steps), so the lists are as hard as val's: each train title's top k among photos of its half,
   in galleries of val's size (their two-tower R@1 is reported, and the run's own heads' on the
   same galleries). A re-ranker (an MLP over the interaction of the photo's and the title's locked
   features and the product of their embeddings, added to the two-tower logit) trained with a
   listwise softmax on those lists; val R@1 after each epoch (the run's own heads give val's lists).

Prints a markdown table per run; --out writes the numbers as JSON. About 10 minutes per run on
the 2-core CPU (the probes about 4, the out-of-fold heads about 3).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import zlib

import numpy as np

LABELS = ("articleType", "baseColour", "gender")
WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def candidate_lists(query_emb: np.ndarray, gallery_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top [Q, k] gallery rows, best first; their cosines [Q, k]) for [Q, D] and [G, D] embeddings."""
    scores = query_emb @ gallery_emb.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, 1)


def r1_after(scores: np.ndarray, hits: np.ndarray) -> float:
    """R@1 when each row's candidates are ordered by `scores` [Q, k] (ties keep the given order); hits [Q, k] bool."""
    first = np.argsort(-scores, axis=1, kind="stable")[:, 0]
    return float(hits[np.arange(len(hits)), first].mean())


def oracle_r1(top: np.ndarray, hits: np.ndarray, query_labels: list[np.ndarray],
              gallery_labels: list[np.ndarray]) -> float:
    """R@1 with the candidates whose every label equals the query's first (two-tower order within)."""
    consistent = np.ones(top.shape, bool)
    for q, g in zip(query_labels, gallery_labels):
        consistent &= g[top] == q[:, None]
    return r1_after(consistent.astype(np.float32), hits)


def label_agreement(photo_probs: np.ndarray, title_probs: np.ndarray, top: np.ndarray) -> np.ndarray:
    """[Q, k] log sum_v p_photo(v) p_title(v): how likely a candidate photo [G, V] and a query title [Q, V] name
    the same value of a label."""
    return np.log(np.einsum("qkv,qv->qk", photo_probs[top], title_probs) + 1e-6)


def probe_probabilities(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, num_classes: int,
                        c: float = 0.1) -> np.ndarray:
    """[N_eval, num_classes] class probabilities of a logistic regression fit on the rows with a label (y >= 0)."""
    from sklearn.linear_model import LogisticRegression

    keep = train_y >= 0
    model = LogisticRegression(C=c, max_iter=200).fit(train_x[keep], train_y[keep])
    probs = np.zeros((len(eval_x), num_classes))
    probs[:, model.classes_] = model.predict_proba(eval_x)
    return probs


def listwise_loss(scores, hits):
    """Mean over lists of -log(softmax mass on the positives); scores [B, k], hits [B, k] bool, each row with one."""
    import jax
    import jax.numpy as jnp

    return jnp.mean(jax.nn.logsumexp(scores, -1) - jax.nn.logsumexp(jnp.where(hits, scores, -1e9), -1))


def title_folds(titles: list[str]) -> np.ndarray:
    """[N] 0 or 1 from a hash of each title, so identical titles fall in the same half."""
    return np.asarray([zlib.crc32(t.encode()) % 2 for t in titles])


def out_of_fold_embeddings(run, image_views: np.ndarray, text_features: np.ndarray, folds: np.ndarray,
                           steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """([N, D], [N, D]) embeddings of each train row by heads trained, from a fresh init, on the other fold only.

    image_views [V, N, F]: the cached photo views (a random one per row and step); text_features [N, F_t], the
    titles as they are (the run's shortened title views are left out). The run's optimizer, loss and batch size,
    with its schedule over `steps`.
    """
    import jax
    import jax.numpy as jnp

    from prodclip import optim, train
    from prodclip.models import factory, inference

    config, graphdef = run.config.copy_and_resolve_references(), run.graphdef
    config.train.num_steps = steps
    batch_size = config.train.batch_size
    token_ids = run.tokenizer(list(run_titles(run)))
    _, fresh = factory.create_model(config, run.tokenizer, seed + 1)
    out_image = np.zeros((image_views.shape[1], config.model.embed_dim), np.float32)
    out_text = np.zeros_like(out_image)
    rng = np.random.default_rng(seed)
    for fold in (0, 1):
        rows = np.flatnonzero(folds != fold)
        params = {**run.params, **{k: fresh[k] for k in fresh if k not in ("image_tower", "text_tower")}}
        tx = optim.make_optimizer(config, params)
        state = {"step": jnp.asarray(0, jnp.int32), "params": params, "opt_state": tx.init(params)}
        step = jax.jit(train.make_train_step(config, graphdef, tx))
        order = np.array([], np.int64)
        for _ in range(steps):
            if len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(rows)])
            batch_rows, order = order[:batch_size], order[batch_size:]
            view = rng.integers(len(image_views), size=batch_size)
            state, _ = step(state, {"image_features": image_views[view, batch_rows], "text_emb": text_features[batch_rows],
                                    "token_ids": token_ids[batch_rows], "ids": batch_rows,
                                    "title_complete": np.ones(batch_size, bool)})
        held = np.flatnonzero(folds == fold)
        embed = lambda features, text: inference.embed_cached_features(graphdef, state["params"], features,
                                                                      config.eval.batch_size, text=text)
        out_image[held], out_text[held] = embed(image_views[0, held], False), embed(text_features[held], True)
    return out_image, out_text


def run_titles(run) -> list[str]:
    from prodclip.data import pipeline

    return pipeline.source_titles(run.sources["train"])


def train_lists(image_emb, text_emb, keys, folds, k: int, gallery_size: int, seed: int = 0):
    """(query rows [L], candidate rows [L, k], cosines [L, k], hits [L, k]) of train titles against galleries of
    `gallery_size` photos of their own fold, drawn in a seeded order (a fold's remainder is a smaller gallery when
    at least half that size, else left out)."""
    rng = np.random.default_rng(seed)
    parts = []
    for fold in (0, 1):
        rows = rng.permutation(np.flatnonzero(folds == fold))
        for start in range(0, len(rows) - gallery_size // 2, gallery_size):
            chunk = rows[start:start + gallery_size]
            top, cosine = candidate_lists(text_emb[chunk], image_emb[chunk], k)
            parts.append((chunk, chunk[top], cosine, keys[chunk][top] == keys[chunk][:, None]))
    return tuple(np.concatenate(p) for p in zip(*parts))


def fit_listwise(train: dict, val: dict, scale: float, *, epochs: int, hidden: int = 256, lr: float = 1e-3,
                 dropout: float = 0.1, batch: int = 256, seed: int = 0) -> list[float]:
    """Trains the listwise re-ranker; val R@1 after each epoch.

    train, val: dicts of the rows the lists index, image_features [N, F] and text_features [N, F_t] (standardised
    locked features), image_emb and text_emb [N, D], and the lists, query [L], candidates, cosine, hits [L, k].
    The score is scale * cosine + an MLP whose last layer starts at zero: training starts from the two-tower order.
    """
    import jax
    import jax.numpy as jnp
    import optax

    width_i, width_t = train["image_features"].shape[1], train["text_features"].shape[1]
    dim = train["image_emb"].shape[1]
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    normal = lambda key, a, b: jax.random.normal(key, (a, b)) / np.sqrt(a)
    params = {"image": normal(keys[0], width_i, hidden), "text": normal(keys[1], width_t, hidden),
              "hidden": normal(keys[2], 2 * hidden + dim, hidden), "bias": jnp.zeros(hidden),
              "out": jnp.zeros((hidden, 1))}

    def score(p, image_f, text_f, image_e, text_e, cosine, key=None):
        # image_f [B, k, F], text_f [B, F_t], image_e [B, k, D], text_e [B, D], cosine [B, k] -> [B, k]
        image = jax.nn.gelu(image_f @ p["image"])
        text = jax.nn.gelu(text_f @ p["text"])[:, None]
        x = jnp.concatenate([image * text, jnp.abs(image - text), text_e[:, None] * image_e], -1)
        if key is not None:
            x = x * jax.random.bernoulli(key, 1 - dropout, x.shape) / (1 - dropout)
        return scale * cosine + (jax.nn.gelu(x @ p["hidden"] + p["bias"]) @ p["out"])[..., 0]

    def inputs(d, rows):
        q, c = d["query"][rows], d["candidates"][rows]
        return (d["image_features"][c], d["text_features"][q], d["image_emb"][c], d["text_emb"][q], d["cosine"][rows])

    steps = epochs * (len(train["query"]) // batch)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 4), steps), weight_decay=1e-4)

    @jax.jit
    def step(p, opt_state, arrays, hits, key):
        loss, grads = jax.value_and_grad(lambda p: listwise_loss(score(p, *arrays, key), hits))(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    val_score = jax.jit(score)

    def val_r1(p):
        rows = np.arange(len(val["query"]))
        scores = [np.asarray(val_score(p, *inputs(val, rows[i:i + batch]))) for i in range(0, len(rows), batch)]
        return r1_after(np.concatenate(scores), val["hits"])

    opt_state, key, per_epoch = tx.init(params), jax.random.PRNGKey(seed + 1), []
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(train["query"]))
        for start in range(0, len(order) - batch + 1, batch):
            rows = order[start:start + batch]
            key, dropout_key = jax.random.split(key)
            params, opt_state, _ = step(params, opt_state, inputs(train, rows), train["hits"][rows], dropout_key)
        per_epoch.append(val_r1(params))
    return per_epoch


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """float32 copies with train's per-column mean removed and its sd divided out."""
    mean, sd = train.mean(0), train.std(0) + 1e-3
    return [((x - mean) / sd).astype(np.float32) for x in (train, *others)]


def locked_features(run, workdir: pathlib.Path) -> dict[str, np.ndarray]:
    """The run's cached train features (image_views [V, N, F], text [N, F_t]) and val's (image [N, F], text [N, F_t],
    the photo as it is), and val's embeddings as evaluation makes them (image_emb, text_emb [N, D])."""
    from prodclip import image_cache, text_cache
    from prodclip.data import pipeline
    from prodclip.models import inference

    config, params, graphdef, train, val = run.config, run.params, run.graphdef, run.sources["train"], run.sources["val"]
    if not (config.optim.lock_image and config.optim.lock_text and config.train.image_cache_views):
        raise SystemExit(f"{workdir}: both towers must be locked with an image cache (configs/myntra_pretrained.py)")
    path = image_cache.train_features_path(config, workdir, params, train)
    if not path.is_file():
        raise SystemExit(f"{path}: no image cache for this run; train it with its cache or pass its image_cache_dir")
    views = np.load(path, mmap_mode="r")
    views = np.asarray(views[:config.train.image_cache_views * len(train)], np.float32).reshape(
        config.train.image_cache_views, len(train), -1)
    text = text_cache.cached_title_features(config, workdir, params, run.tokenizer, pipeline.source_titles(train))
    if text is None:
        raise SystemExit(f"{workdir}: the text cache lacks the train titles for these weights")
    image_emb, text_emb = inference.embed_source(graphdef, params, val, run.tokenizer, config)
    image_features, text_features = inference.feature_encoders(graphdef)[:2]
    val_image = image_cache.compute_features(val, run.tokenizer, config, lambda x: image_features(params, x))
    val_ids = run.tokenizer(pipeline.source_titles(val))
    val_text = np.concatenate([b[0] for b in inference.batched(lambda t: text_features(params, t), (val_ids,),
                                                                config.eval.batch_size)])
    return {"image_views": views, "text": np.asarray(text, np.float32), "val_image": val_image,
            "val_text": val_text.astype(np.float32), "image_emb": image_emb, "text_emb": text_emb}


def measure(workdir: pathlib.Path, *, k: int, labels: tuple[str, ...], epochs: int, fold_steps: int) -> dict:
    from prodclip import losses
    from prodclip import run as run_lib
    from prodclip.evaluate import suite
    from prodclip.models import inference

    start = time.time()
    run = run_lib.load_run(workdir, splits=["train", "val"])
    config, train, val = run.config, run.sources["train"], run.sources["val"]
    scale = losses.trained_logit_scale(run.params, config.model.logit_scale_max)
    f = locked_features(run, workdir)
    val_keys, train_keys = suite.retrieval_keys(val)[0], suite.retrieval_keys(train)[0]
    top, cosine = candidate_lists(f["text_emb"], f["image_emb"], k)
    hits = val_keys[top] == val_keys[:, None]
    out = {"k": k, "logit_scale": scale, "two_tower_r1": float(hits[:, 0].mean()), f"r@{k}": float(hits.any(1).mean())}
    log = lambda what: print(f"{workdir}: {what} ({time.time() - start:.0f} s)", flush=True)
    log("embedded")

    val_labels = {a: suite.zeroshot_classes(a, val, config, run.label_stats) for a in labels}
    train_labels = {a: suite.zeroshot_classes(a, train, config, run.label_stats)[2] for a in labels}
    out["oracle_r1"] = {a: oracle_r1(top, hits, [val_labels[a][2]], [val_labels[a][2]]) for a in labels}
    out["oracle_r1"]["+".join(labels)] = oracle_r1(top, hits, [val_labels[a][2] for a in labels],
                                                   [val_labels[a][2] for a in labels])
    wrong = ~hits[:, 0]
    out["wrong_first_shares"] = {a: float(np.mean(val_labels[a][2][top[wrong, 0]] == val_labels[a][2][wrong]))
                                 for a in labels}

    train_image, val_image = standardise(f["image_views"][0], f["val_image"])
    train_text, val_text = standardise(f["text"], f["val_text"])
    agreement, out["probe_accuracy"] = 0.0, {}
    for a in labels:
        names, _, y = val_labels[a]
        photo = probe_probabilities(train_image, train_labels[a], val_image, len(names))
        title = probe_probabilities(train_text, train_labels[a], val_text, len(names))
        out["probe_accuracy"][a] = {"photo": float(np.mean(photo.argmax(1)[y >= 0] == y[y >= 0])),
                                    "title": float(np.mean(title.argmax(1)[y >= 0] == y[y >= 0]))}
        agreement = agreement + label_agreement(photo, title, top)
        log(f"probes for {a}")
    out["probe_rerank_r1"] = {f"w={w:g}": r1_after(scale * cosine + w * agreement, hits) for w in WEIGHTS}

    folds = title_folds(run_titles(run))
    own_image = inference.embed_cached_features(run.graphdef, run.params, f["image_views"][0], config.eval.batch_size)
    own_text = inference.embed_cached_features(run.graphdef, run.params, f["text"], config.eval.batch_size, text=True)
    out["in_sample_r1"] = float(train_lists(own_image, own_text, train_keys, folds, k, len(val))[3][:, 0].mean())
    fold_image, fold_text = out_of_fold_embeddings(run, f["image_views"], f["text"], folds, fold_steps, config.seed)
    lists = train_lists(fold_image, fold_text, train_keys, folds, k, len(val))
    out["out_of_fold_r1"] = float(lists[3][:, 0].mean())
    with_positive = lists[3].any(1)  # the listwise loss needs one
    query, candidates, list_cosine, list_hits = (x[with_positive] for x in lists)
    out["train_lists"] = int(len(query))
    log("out-of-fold lists")
    train_rows = {"image_features": train_image, "text_features": train_text, "image_emb": fold_image,
                  "text_emb": fold_text, "query": query, "candidates": candidates, "cosine": list_cosine,
                  "hits": list_hits}
    val_rows = {"image_features": val_image, "text_features": val_text, "image_emb": f["image_emb"],
                "text_emb": f["text_emb"], "query": np.arange(len(val)), "candidates": top, "cosine": cosine,
                "hits": hits}
    out["listwise_r1_per_epoch"] = fit_listwise(train_rows, val_rows, scale, epochs=epochs, seed=config.seed)
    out["seconds"] = time.time() - start
    log("listwise re-ranker")
    return out


def table(workdir: str, r: dict) -> str:
    rows = [("two-tower", r["two_tower_r1"]), *((f"oracle: {a}", v) for a, v in r["oracle_r1"].items()),
            *((f"probes, {w}", v) for w, v in r["probe_rerank_r1"].items()),
            *((f"listwise, epoch {i + 1}", v) for i, v in enumerate(r["listwise_r1_per_epoch"]))]
    accuracy = ", ".join(f"{a} {v['photo']:.3f} / {v['title']:.3f}" for a, v in r["probe_accuracy"].items())
    k = r["k"]
    shares = ", ".join(f"{a} {v:.2f}" for a, v in r["wrong_first_shares"].items())
    return "\n".join([f"{workdir}: val t->i R@1 re-ranking the two-tower top {k} (R@{k} {r[f'r@{k}']:.3f}); "
                      f"wrong first photos sharing the query's label: {shares}; "
                      f"probe accuracy photo / title: {accuracy}; train lists R@1 out of fold "
                      f"{r['out_of_fold_r1']:.3f}, the run's own heads {r['in_sample_r1']:.3f}",
                      "", "| re-ranker | R@1 |", "|---|---:|", *(f"| {name} | {v:.3f} |" for name, v in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--labels", default=",".join(LABELS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--fold-steps", type=int, default=400,
                        help="steps of each half's heads at the run's batch size (400: the passes over its half that "
                             "the default's 800 steps make over train)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.out is not None and args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another --out")
    results = {}
    for workdir in args.workdirs:
        results[str(workdir)] = measure(workdir, k=args.k, labels=tuple(args.labels.split(",")), epochs=args.epochs,
                                        fold_steps=args.fold_steps)
        print(table(str(workdir), results[str(workdir)]), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
