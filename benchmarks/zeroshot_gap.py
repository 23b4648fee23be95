"""Where zero-shot loses to the linear probe: the class prompts, or the image embeddings?

    PRODCLIP_MYNTRA_DIR=/path/to/myntra python benchmarks/zeroshot_gap.py --workdir runs/pretrained/lit \
        --label articleType --titles-per-class 50

For the run's zero-shot classes of --label (eval.min_class_count applied, as in eval.json), the val
photos are classified twice with the same image embeddings:

  prompts   the class names in eval.prompt_templates / eval.label_templates (eval.json's zero-shot),
            and in each --templates set;
  titles    the mean text embedding of up to --titles-per-class train titles of the class, drawn
            with a fixed seed: the class described in the catalog's own words, no label name used.

Only the text side's description of a class differs, so the gap between the two rows is what class
naming costs, and the `titles` row is a bound of sorts on what better prompts could reach. The
`titles` row uses train labels (it is not zero-shot); it is a diagnostic, not a result. Each row
comes again as "<row>, adapted prior": the same scores with the class shares that EM estimates
from the val photos themselves (eval.zeroshot_adapt_prior, prodclip/evaluate/zeroshot.py), and
as "<row>, train prior": with the shares EM estimates from the unlabelled train photos
(eval.zeroshot_train_prior; their embeddings from the run's image cache when it has them).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from prodclip import image_cache, losses, run as run_lib  # noqa: E402
from prodclip.data import pipeline  # noqa: E402
from prodclip.evaluate import suite, zeroshot  # noqa: E402
from prodclip.models import inference  # noqa: E402


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--label", default="articleType")
    parser.add_argument("--titles-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--templates", action="append", default=[],
                        help="another prompt set to score, templates joined by '|' (e.g. '{}|men {}|women {}')")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    run = run_lib.load_run(args.workdir, splits=("train", "val"))
    config, train, val = run.config, run.sources["train"], run.sources["val"]
    _, names, val_labels = suite.zeroshot_classes(args.label, val, config, run.label_stats)
    _, _, train_labels = suite.zeroshot_classes(args.label, train, config, run.label_stats)
    image_emb = inference.embed_images(run.graphdef, run.params, val, run.tokenizer, config)
    train_emb = suite.train_photo_embeddings(
        run.graphdef, run.params, train, run.tokenizer, config,
        image_cache.cached_train_embeddings(config, args.workdir, run.graphdef, run.params, train))
    encode = inference.title_encoder(run.graphdef, run.params, run.tokenizer, config.eval.batch_size)

    prompt_emb = zeroshot.class_embeddings(encode, names, zeroshot.label_templates(args.label, config))
    titles = pipeline.source_titles(train)
    rng = np.random.default_rng(args.seed)
    title_emb = []
    for c in range(len(names)):
        rows = np.flatnonzero(train_labels == c)
        rows = rng.choice(rows, min(args.titles_per_class, len(rows)), replace=False)
        title_emb.append(l2(encode([titles[i] for i in rows])).mean(axis=0))
    title_emb = l2(np.stack(title_emb)).astype(np.float32)

    out = {"workdir": args.workdir, "label": args.label, "classes": len(names),
           "val_items": int((val_labels >= 0).sum()), "titles_per_class": args.titles_per_class}
    rows = [("prompts", prompt_emb), ("titles", title_emb)]
    rows += [(f"prompts {t}", zeroshot.class_embeddings(encode, names, t.split("|"))) for t in args.templates]
    scale = losses.trained_logit_scale(run.params, config.model.logit_scale_max)
    for name, class_emb in rows:
        scores = image_emb @ class_emb.T
        for row, metrics in ((name, zeroshot.classify_scores(scores, val_labels)),
                             (f"{name}, adapted prior", zeroshot.classify_adapted(scores, val_labels, scale)),
                             (f"{name}, train prior", zeroshot.classify_adapted(
                                 scores, val_labels, scale, prior_scores=train_emb @ class_emb.T))):
            out[row] = {k: round(v, 4) for k, v in metrics.items() if not k.startswith("class/")}
    print(json.dumps(out, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
