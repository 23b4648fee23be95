"""Catalog audit: find the listings whose photo does not match their title.

    prodclip audit --workdir RUN --catalog catalog.parquet --out REPORT

Every listing's own (photo, title) pair is scored with the run's match calibration
(prodclip/evaluate/matching.py) and the listings are ranked from the likeliest mismatch. A
calibration fit with match.hubness_k = k > 0 scores the cosine corrected for hubness against the
catalog itself: two more exact top-k passes, every photo against all titles and every title
against all photos. A calibration fit with match.attribute_labels also reads the colour and gender
words of each title against its photo's zero-shot posterior (evaluate/attribute_check.py).
For each flagged one the report shows the catalog titles its photo matches best ("looks like")
and the catalog photos its title matches best.

Which listings are flagged. The calibration is fit on a pair benchmark where half the pairs are
wrong; a real catalog has a few percent wrong, and a threshold chosen on the benchmark (max F1)
flags mostly correct listings there. So the flag threshold is chosen for the catalog's expected
mismatch rate pi (match.audit_error_rate, default 0.03): with F_mis(t) and F_mat(t) the shares of
the fit split's mismatched and matched pairs whose p(match) is below t, a catalog with rate pi
has, among the listings below t, the expected precision

    precision(t) = pi F_mis(t) / (pi F_mis(t) + (1 - pi) F_mat(t))      (prior shift)

and the threshold is the largest t whose precision(t) reaches match.audit_target_precision
(default 0.5: at least every second flag a real mismatch), or the t of the highest precision when
none does. The report's header gives the expected precision and recall of the flags.

It scales like `prodclip embed`: the catalog is embedded once into two sharded stores
(REPORT/stores/images, REPORT/stores/titles; re-running resumes them), own-pair scores are
read shard by shard, and the look-ups run as chunked top-k over the stores.

Written into REPORT:
  audit.csv    one row per listing, likeliest mismatch first: rank, row, id, title, cosine,
               match_probability, attribute_evidence (with match.attribute_labels: per label the
               title names a value of, that value, the photo's likeliest and their probabilities,
               as JSON; shown in the HTML too), flagged, looks_like (a JSON list of titles), looks_like_ids and
               title_matches_ids (space-separated ids; flagged listings only);
               unscorable listings (unreadable image, empty title, ...) follow with status
               "unscorable" and the reason: none is dropped.
  audit.html   the flagged listings with thumbnails, then the unscorable ones.
  audit.json   counts, threshold, calibration.
"""

from __future__ import annotations

import base64
import copy
import csv
import dataclasses
import html
import json
import logging
import pathlib

import ml_collections
import numpy as np

from prodclip import search
from prodclip.data.catalog import png_bytes
from prodclip.evaluate import attribute_check, hubness, matching
from prodclip.evaluate import store as store_lib

log = logging.getLogger("prodclip")

AUDIT_SPLIT = "audit"
CSV_FIELDS = ("rank", "row", "id", "title", "cosine", "match_probability", "attribute_evidence", "flagged",
              "looks_like", "looks_like_ids", "title_matches_ids", "status", "reason")


def catalog_config(config: ml_collections.ConfigDict, catalog: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The run's config with data.* pointing at one catalog file (columns named as the run's data config)."""
    config = copy.deepcopy(config)
    config.data.name = "catalog"
    config.data.path = str(pathlib.Path(catalog).absolute())
    return config


def check_catalog(config: ml_collections.ConfigDict, catalog: str | pathlib.Path) -> None:
    """Raises DataError if `catalog` is missing or lacks a column the run reads; writes nothing."""
    from prodclip.data import catalog as catalog_lib
    from prodclip.data import sources

    d = catalog_config(config, catalog).data
    catalog_lib.check_columns(sources.catalog_file(d.path, AUDIT_SPLIT), image_column=d.image_column,
                              id_column=d.id_column, title_template=d.title_template)


def own_pair_cosines(image_store: store_lib.Store, title_store: store_lib.Store) -> np.ndarray:
    """[N] float64 cosine of each listing's photo with its own title, read one shard at a time."""
    return np.concatenate([np.einsum("nd,nd->n", np.asarray(a, np.float64), np.asarray(b, np.float64))
                           for a, b in zip(image_store.shards, title_store.shards)])


def store_density(queries: store_lib.Store, reference: store_lib.Store, k: int, chunk_size: int) -> np.ndarray:
    """[N] float64 mean of the k best cosines of every row of `queries` over all rows of `reference`."""
    out = [search.top_k(reference.shards, rows, k, chunk_size=chunk_size)[0].astype(np.float64).mean(axis=1)
           for _, rows in queries.iter_rows(4096)]
    return np.concatenate(out) if out else np.zeros(0)


def listing_attributes(graphdef, params, tokenizer, config: ml_collections.ConfigDict, labels: tuple[str, ...],
                       image_store: store_lib.Store, title_store: store_lib.Store,
                       workdir: str | pathlib.Path) -> tuple[np.ndarray, list[dict]]:
    """([N] float64 attribute log-likelihood, N evidence dicts) of each listing's photo and own title
    (attribute_check.check), over the run's label vocabulary (labels.json), read one shard at a time."""
    from prodclip.data import sources
    from prodclip.models import inference

    vocabulary = sources.load_label_vocabulary(pathlib.Path(workdir)) or {}
    encode = inference.title_encoder(graphdef, params, tokenizer, config.eval.batch_size)
    classes = matching.attribute_classes(params, config, encode, labels,
                                         {k: v["names"] for k, v in vocabulary.items()})
    out, evidence, start = [], [], 0
    for shard in image_store.shards:
        scores, found = attribute_check.check(np.asarray(shard), title_store.titles[start:start + len(shard)], classes)
        out.append(scores)
        evidence.extend(found)
        start += len(shard)
    return (np.concatenate(out) if out else np.zeros(0)), evidence


def nearest_others(queries: np.ndarray, store: store_lib.Store, own_rows: np.ndarray, k: int, chunk_size: int,
                   *, distinct_titles: bool = False) -> np.ndarray:
    """[Q, k] int64 best store rows per query, the query's own row left out (-1 where fewer exist).

    distinct_titles: keep one row per title (compared as pairs.title_key), none with the own row's title.
    """
    from prodclip.evaluate.pairs import title_key

    depth = 3 * k + 1 if distinct_titles else k + 1
    _, index = search.top_k(store.shards, queries, depth, chunk_size=chunk_size)
    out = np.full((len(queries), k), -1, np.int64)
    for q, (hits, own) in enumerate(zip(index, own_rows)):
        seen, kept = {title_key(store.titles[own])}, []
        for hit in hits:
            key = title_key(store.titles[hit]) if distinct_titles else hit
            if hit == own or key in seen:
                continue
            seen.add(key)
            kept.append(hit)
            if len(kept) == k:
                break
        out[q, :len(kept)] = kept
    return out


def flag_threshold(fit_scores: dict, error_rate: float, target_precision: float) -> dict:
    """The flag threshold for a catalog with `error_rate` mismatched listings (see the module docstring).

    fit_scores: {"matched": [...], "mismatched": [...]} p(match) quantiles of the fit split
    (Calibration.fit_scores[score]). Returns {"threshold", "expected_precision", "expected_recall",
    "reached"}: listings with p(match) < threshold are flagged.
    """
    matched = np.sort(np.asarray(fit_scores["matched"], np.float64))
    mismatched = np.sort(np.asarray(fit_scores["mismatched"], np.float64))
    # Candidate thresholds just above each mismatched pair's score: each flags one more of them.
    candidates = np.nextafter(mismatched, np.inf)
    below_mis = np.searchsorted(mismatched, candidates, side="left") / len(mismatched)
    below_mat = np.searchsorted(matched, candidates, side="left") / max(len(matched), 1)
    flagged_share = error_rate * below_mis + (1 - error_rate) * below_mat
    precision = error_rate * below_mis / np.maximum(flagged_share, 1e-300)
    ok = np.flatnonzero(precision >= target_precision)
    best = int(ok[-1]) if len(ok) else int(np.flatnonzero(precision == precision.max())[-1])
    return {"threshold": float(candidates[best]), "expected_precision": float(precision[best]),
            "expected_recall": float(below_mis[best]), "reached": bool(len(ok))}


def _own_itm(itm_fn: matching.ItmFn, source, tokenizer, config) -> np.ndarray:
    from prodclip.data import pipeline

    return np.concatenate([np.asarray(itm_fn(b["images"], b["token_ids"]), np.float64).reshape(-1)
                           for b in pipeline.eval_batches(source, tokenizer, config)])


def audit_catalog(graphdef, params, tokenizer, config: ml_collections.ConfigDict, catalog: str | pathlib.Path,
                  out_dir: str | pathlib.Path, calibration: matching.Calibration, *, workdir: str | pathlib.Path,
                  itm_fn: matching.ItmFn | None = None, progress: bool = True) -> dict:
    """Scores, ranks and reports every listing of `catalog` (see the module docstring). Returns the summary."""
    import tqdm

    from prodclip.data import sources

    out = pathlib.Path(out_dir)
    config = catalog_config(config, catalog)
    source = sources.open_catalog(config, sources.catalog_file(config.data.path, AUDIT_SPLIT))
    out.mkdir(parents=True, exist_ok=True)
    sources.report_skipped({AUDIT_SPLIT: source}, out)
    unscorable = source.report.to_dict()["skipped_rows"]
    stores = {"image": out / "stores" / "images", "text": out / "stores" / "titles"}
    store_lib.embed_catalog_views(graphdef, params, source, tokenizer, config, stores, split=AUDIT_SPLIT,
                                  workdir=workdir, progress=progress)
    image_store, title_store = store_lib.open_store(stores["image"]), store_lib.open_store(stores["text"])

    cos = own_pair_cosines(image_store, title_store)
    if itm_fn is not None and calibration.combined is None:
        log.warning("the calibration was fit without a fusion head; ranking by the two-tower score only")
        itm_fn = None
    itm = _own_itm(itm_fn, source, tokenizer, config) if itm_fn is not None else None
    pair_score = cos
    k, chunk = config.match.looks_like_k, config.embed.chunk_size
    if calibration.hubness_k:
        pair_score = hubness.corrected(cos, store_density(image_store, title_store, calibration.hubness_k, chunk),
                                       store_density(title_store, image_store, calibration.hubness_k, chunk))
    attribute, evidence = None, None
    if calibration.attribute_labels:
        attribute, evidence = listing_attributes(graphdef, params, tokenizer, config, calibration.attribute_labels,
                                                 image_store, title_store, workdir)
    score = calibration.best_score()
    prob = calibration.probabilities(pair_score, itm, attribute)[score]
    m = config.match
    if calibration.fit_scores and score in calibration.fit_scores:
        flags = flag_threshold(calibration.fit_scores[score], m.audit_error_rate, m.audit_target_precision)
        if not flags["reached"]:
            log.warning("no threshold reaches the expected precision %.2f at an error rate of %.3f; flagging at the "
                        "highest (%.2f)", m.audit_target_precision, m.audit_error_rate, flags["expected_precision"])
    else:
        flags = {"threshold": calibration.thresholds[score], "expected_precision": None, "expected_recall": None,
                 "reached": False}
        log.warning("the calibration has no fit-split scores (saved by an older prodclip): flagging at its %s "
                    "threshold, whose precision on a catalog is unknown; refit it with `prodclip match`",
                    calibration.rule)
    threshold = flags["threshold"]
    order = np.argsort(prob, kind="stable")
    flagged = order[prob[order] < threshold]

    looks_like = np.zeros((0, k), np.int64)
    title_matches = np.zeros((0, k), np.int64)
    block = 4096
    bar = tqdm.tqdm(total=len(flagged), desc="looks like", unit="listing", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(flagged), block):
        rows = flagged[start:start + block]
        looks_like = np.concatenate([looks_like, nearest_others(image_store.rows(rows), title_store, rows,
                                                                k, chunk, distinct_titles=True)])
        title_matches = np.concatenate([title_matches, nearest_others(title_store.rows(rows), image_store,
                                                                      rows, k, chunk)])
        bar.update(len(rows))
    bar.close()
    neighbours = {int(r): (looks_like[i], title_matches[i]) for i, r in enumerate(flagged)}

    _write_csv(out / "audit.csv", order, cos, prob, neighbours, title_store, unscorable, evidence)
    summary = {
        "catalog": str(catalog), "num_listings": int(len(cos) + len(unscorable)), "num_scored": int(len(cos)),
        "num_unscorable": len(unscorable), "num_flagged": int(len(flagged)), "score": score,
        "threshold": threshold, "expected_error_rate": m.audit_error_rate,
        "target_precision": m.audit_target_precision, "expected_precision": flags["expected_precision"],
        "expected_recall": flags["expected_recall"], "precision_target_reached": flags["reached"],
        "calibration": {k: v for k, v in dataclasses.asdict(calibration).items() if k != "fit_scores"},
        "unscorable_reasons": source.report.to_dict()["skipped"],
    }
    shown = flagged[:config.match.report_rows]
    thumbs = [int(r) for r in shown] + [int(i) for r in shown for i in neighbours[int(r)][1] if i >= 0]
    images = dict(zip(thumbs, search.store_images(image_store, thumbs))) if thumbs else {}
    _write_html(out / "audit.html", summary, shown, cos, prob, neighbours, title_store, images, unscorable, evidence)
    (out / "audit.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def expected_flags_line(summary: dict) -> str:
    """One sentence: the expected precision and recall of the flags, and the assumption behind them."""
    if summary["expected_precision"] is None:
        return "Expected precision of the flags: unknown (the calibration keeps no fit-split scores)."
    return (f"Expected precision of the flags: {summary['expected_precision']:.2f}, expected recall "
            f"{summary['expected_recall']:.2f}, if {summary['expected_error_rate']:.1%} of the listings are "
            f"mismatched (match.audit_error_rate; target precision {summary['target_precision']:.2f}).")


def evidence_line(evidence: dict) -> str:
    """'baseColour: title says Blue (p 0.03), photo looks Red (0.71); ...' from attribute_check.check's evidence."""
    return "; ".join(f"{label}: title says {e['named']} (p {e['p_named']:.2f}), photo looks {e['photo']} "
                     f"({e['p_photo']:.2f})" for label, e in evidence.items())


def _write_csv(path: pathlib.Path, order: np.ndarray, cos: np.ndarray, prob: np.ndarray, neighbours: dict,
               titles: store_lib.Store, unscorable: list[dict], evidence: list[dict] | None) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for rank, row in enumerate(order, start=1):
            row = int(row)
            looks, matches = neighbours.get(row, ((), ()))
            writer.writerow({
                "rank": rank, "row": row, "id": titles.ids[row], "title": titles.titles[row],
                "cosine": f"{cos[row]:.6f}", "match_probability": f"{prob[row]:.6f}",
                "attribute_evidence": json.dumps(evidence[row], ensure_ascii=False) if evidence else "",
                "flagged": int(row in neighbours),
                "looks_like": json.dumps([titles.titles[i] for i in looks if i >= 0], ensure_ascii=False),
                "looks_like_ids": " ".join(str(titles.ids[i]) for i in looks if i >= 0),
                "title_matches_ids": " ".join(str(titles.ids[i]) for i in matches if i >= 0),
                "status": "scored", "reason": "",
            })
        for bad in unscorable:
            writer.writerow({"row": bad["row"], "id": bad["id"], "status": "unscorable",
                             "reason": f"{bad['reason']}: {bad['detail']}".rstrip(": ")})


def _thumbnail(image: np.ndarray | None, width: int) -> str:
    if image is None:
        return f'<div class="missing" style="width:{width}px;height:{width}px">no image</div>'
    data = base64.b64encode(png_bytes(image)).decode()
    return f'<img src="data:image/png;base64,{data}" width="{width}">'


def _write_html(path: pathlib.Path, summary: dict, shown: np.ndarray, cos: np.ndarray, prob: np.ndarray,
                neighbours: dict, titles: store_lib.Store, images: dict, unscorable: list[dict],
                evidence: list[dict] | None) -> None:
    esc = lambda text: html.escape(str(text))  # noqa: E731
    rows = []
    for rank, row in enumerate(shown, start=1):
        row = int(row)
        looks, matches = neighbours[row]
        looks_like = "".join(f"<li>{esc(titles.titles[i])}</li>" for i in looks if i >= 0)
        matched = "".join(f"<figure>{_thumbnail(images.get(int(i)), 64)}<figcaption>{esc(titles.titles[i])}"
                          "</figcaption></figure>" for i in matches if i >= 0)
        rows.append(f"<tr><td>{rank}</td><td>{_thumbnail(images.get(row), 96)}</td>"
                    f"<td><b>{esc(titles.titles[row])}</b><br><small>id {esc(titles.ids[row])} &middot; "
                    f"p(match) {prob[row]:.3f} &middot; cos {cos[row]:.3f}"
                    + (f"<br>{esc(evidence_line(evidence[row]))}" if evidence and evidence[row] else "")
                    + "</small></td>"
                    f"<td>looks like:<ol>{looks_like}</ol></td><td><div class='grid'>{matched}</div></td></tr>")
    bad = "".join(f"<tr><td>{esc(b['row'])}</td><td>{esc(b['id'])}</td><td>{esc(b['reason'])}</td>"
                  f"<td>{esc(b['detail'])}</td></tr>" for b in unscorable)
    page = (
        "<!doctype html><meta charset='utf-8'><title>prodclip audit</title><style>"
        "body{font-family:sans-serif}td{vertical-align:top;padding:6px;border-bottom:1px solid #ddd}"
        ".grid{display:flex;gap:6px}figure{width:80px;margin:0}figcaption{font-size:10px}"
        ".missing{background:#ddd;font-size:10px}</style>"
        f"<h2>Catalog audit: {esc(summary['catalog'])}</h2>"
        f"<p>{summary['num_listings']} listings: {summary['num_scored']} scored, {summary['num_flagged']} flagged "
        f"(p(match) &lt; {summary['threshold']:.3f}, {esc(summary['score'])} score), "
        f"{summary['num_unscorable']} unscorable. Showing the {len(shown)} likeliest mismatches.</p>"
        f"<p>{esc(expected_flags_line(summary))}</p>"
        "<table><tr><th>#</th><th>photo</th><th>title</th><th>its photo</th><th>its title matches these photos"
        f"</th></tr>{''.join(rows)}</table>"
        f"<h3>Unscorable listings ({len(unscorable)})</h3><table><tr><th>row</th><th>id</th><th>reason</th>"
        f"<th>detail</th></tr>{bad}</table>\n")
    path.write_text(page, encoding="utf-8")


def load_or_fit_calibration(graphdef, params, tokenizer, config: ml_collections.ConfigDict,
                            workdir: str | pathlib.Path, out_dir: str | pathlib.Path,
                            calibration_path: str | pathlib.Path | None = None,
                            itm_fn: matching.ItmFn | None = None) -> matching.Calibration:
    """The given calibration file, else the run's (workdir/match_calibration.json), else one fit now on the
    run's config.match.fit_split and saved into out_dir."""
    from prodclip.data import sources

    for path in (calibration_path, pathlib.Path(workdir) / matching.CALIBRATION_FILE):
        if path is not None and pathlib.Path(path).exists():
            return matching.Calibration.load(path)
    if calibration_path is not None:
        raise FileNotFoundError(f"calibration file not found: {calibration_path}")
    split = config.match.fit_split
    log.info("no %s in %s: fitting the match calibration on split %r", matching.CALIBRATION_FILE, workdir, split)
    source = sources.make_source(config, split)
    scored = matching.score_split(graphdef, params, source, tokenizer, config, split, itm_fn=itm_fn)
    calibration = matching.calibrate(scored, params, config)
    pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
    calibration.save(pathlib.Path(out_dir) / matching.CALIBRATION_FILE)
    return calibration
