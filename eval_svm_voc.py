#!/usr/bin/env python
"""VOC07 linear SVM on frozen features (PCL ``eval_svm_voc.py``; disco_pcl_evals.md C1, D3.1).

    python eval_svm_voc.py --pretrained experiment_pcl/checkpoint_0199.pth.tar -a resnet50 [--low-shot] /data/VOC2007
    python eval_svm_voc.py --pretrained pcl_v2_r50_e200 -a resnet50 /data/VOC2007   # the released PCL v2 (zoo name)

Train on ``trainval``, test on ``test``. Full mode: one SVM per class on every trainval image.
``--low-shot``: k ∈ {1, 2, 4, 8, 16} images per class, 5 runs each from one seeded stream, mean ± std
per k and cost. Each result is the maximum over ``--cost`` of the mean mAP (the cost is picked on test,
as the official script). Features are cached in ``--cache_dir`` (keyed by checkpoint contents, arch,
image size and image list): a second run with other costs or modes does not recompute them.
``-j`` sets the loader workers and the number of classes fitted in parallel.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random

import numpy as np
import torch

from src import zoo
from src.cli import HelpFormatter
from src.checkpoint import load_backbone
from src.data.transforms import eval_transform
from src.errors import UserError, cli_main
from src.eval import svm_voc as V
from src.eval.features import extract_features
from src.logger import setup_logging
from src.models.backbones import arch_spec, build_backbone, feat_dim
from src.models.teacher import file_sha256

log = logging.getLogger("ssl")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="VOC07 linear SVM evaluation", formatter_class=HelpFormatter)
    p.add_argument("data", metavar="DIR", help="VOC2007 folder (or its parent, or a folder with VOCdevkit/VOC2007); no val/ folder: the splits come from DIR/ImageSets/Main (trainval, test)")
    p.add_argument("-a", "--arch", default="resnet50", help="backbone of the checkpoint")
    p.add_argument("--pretrained", default="", help="checkpoint (any layout load_backbone knows): a path, an http(s) "
                   "URL or a zoo name (python -m src.zoo list); empty: random")
    p.add_argument("-j", "--workers", default=8, type=int, help="loader workers and SVMs fitted in parallel")
    p.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", default=32, type=int,
                   help="feature-extraction batch per process")
    p.add_argument("--low-shot", "--low_shot", dest="low_shot", action="store_true", help="k = 1, 2, 4, 8, 16 per class")
    p.add_argument("--cost", default="0.5", type=str, help="comma-separated SVM costs C (the best is reported)")
    p.add_argument("--seed", default=0, type=int, help="seed of the low-shot draws")
    p.add_argument("--image_size", default=224, type=int, help="centre-crop size (resize = size*256/224)")
    p.add_argument("--cache_dir", default=None, help="feature cache (None: <output_dir>/feature_cache)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default="svm_voc",
                   help="results.json and the log")
    return p


def parse_costs(s: str) -> list[float]:
    try:
        costs = [float(c) for c in s.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--cost must be comma-separated numbers, got {s!r}") from None
    if not costs or min(costs) <= 0:
        raise UserError(f"--cost needs positive numbers, got {s!r}")
    return costs


def cache_key(args: argparse.Namespace, split: str, ids: list[str]) -> str:
    h = hashlib.sha256()
    ck = file_sha256(args.pretrained) if args.pretrained else f"random-{args.seed}"
    h.update(json.dumps([ck, args.arch, args.image_size, split, ids]).encode())
    return h.hexdigest()[:20]


def features(args, net, voc: str, split: str, ids: list[str], labels: np.ndarray, device) -> np.ndarray:
    """L2-normalised pooled features of ``split``, from the cache when it has them."""
    cache = os.path.join(args.cache_dir, f"voc07_{split}_{cache_key(args, split, ids)}.npy")
    if os.path.isfile(cache):
        log.info("features of %s from the cache %s", split, cache)
        return np.load(cache)
    ds = V.VOCImages(voc, ids, labels, eval_transform(args.image_size))
    f, y = extract_features(net(), ds, args.batch_size, args.workers, device, normalize=False,
                            desc=f"features {split}")
    assert torch.equal(y.cpu(), torch.as_tensor(labels))
    x = V.l2_normalise(f.cpu().double().numpy()).astype(np.float32)
    os.makedirs(args.cache_dir, exist_ok=True)
    tmp = cache + ".tmp.npy"
    np.save(tmp, x)
    os.replace(tmp, cache)
    log.info("features of %s: %d x %d, cached in %s", split, *x.shape, cache)
    return x


def run(args: argparse.Namespace) -> dict:
    voc = V.find_voc_root(args.data)
    costs = parse_costs(args.cost)
    args.cache_dir = args.cache_dir or os.path.join(args.output_dir, "feature_cache")
    train_ids, train_y = V.read_split(voc, "trainval")
    test_ids, test_y = V.read_split(voc, "test")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built: list = []

    def net():  # built only when some features are not cached
        if not built:
            if args.pretrained:
                m = load_backbone(args.pretrained, args.arch)
                log.info("loaded %s (prefix %r)", args.pretrained, m.loaded_prefix)
            else:
                log.warning("no --pretrained: random %s backbone (seed %d)", args.arch, args.seed)
                torch.manual_seed(args.seed)
                m = build_backbone(args.arch)
            built.append(m.to(device).eval())
        return built[0]

    train_x = features(args, net, voc, "trainval", train_ids, train_y, device)
    test_x = features(args, net, voc, "test", test_ids, test_y, device)
    log.info("trainval %d images, test %d images, feature dim %d (%s)", len(train_ids), len(test_ids),
             train_x.shape[1], args.arch)
    results: dict = {"arch": args.arch, "pretrained": args.pretrained, "costs": costs, "feature_dim": train_x.shape[1],
                     "trainval_images": len(train_ids), "test_images": len(test_ids)}
    if not args.low_shot:
        per_cost = {}
        for c in costs:
            m, aps = V.svm_map(train_x, train_y, test_x, test_y, c, args.workers)
            per_cost[str(c)] = {"mAP": m, "ap": aps}
            log.info("full, cost %g: mAP %.2f", c, m)
        best = max(costs, key=lambda c: per_cost[str(c)]["mAP"])
        results["full"] = {"per_cost": per_cost, "best_cost": best, "mAP": per_cost[str(best)]["mAP"]}
        log.info("full: mAP %.2f (cost %g)", results["full"]["mAP"], best)
        return results
    rng = random.Random(args.seed)   # one stream for every draw, consumed in the order k → cost → run
    np.random.seed(args.seed)
    low = {}
    for k in V.LOW_SHOT_KS:
        per_cost = {}
        for c in costs:
            maps = []
            for run_i in range(V.N_RUNS):
                idx = V.low_shot_indices(train_y, k, rng)
                m, _ = V.svm_map(train_x[idx], train_y[idx], test_x, test_y, c, args.workers)
                maps.append(m)
            per_cost[str(c)] = {"mean": float(np.mean(maps)), "std": float(np.std(maps)), "runs": maps}
            log.info("k=%d cost %g: mAP %.2f ± %.2f over %d runs", k, c, np.mean(maps), np.std(maps), V.N_RUNS)
        best = max(costs, key=lambda c: per_cost[str(c)]["mean"])
        low[str(k)] = {"per_cost": per_cost, "best_cost": best, "mAP": per_cost[str(best)]["mean"],
                       "std": per_cost[str(best)]["std"]}
    results["low_shot"] = low
    log.info("low-shot mAP: %s", " | ".join(f"k={k} {v['mAP']:.2f} ± {v['std']:.2f}" for k, v in low.items()))
    return results


@cli_main
def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    arch_spec(args.arch)
    parse_costs(args.cost)
    args.pretrained_source = args.pretrained
    args.pretrained = zoo.resolve_arg(args.pretrained, "--pretrained", args.arch)  # a URL / zoo name: downloaded
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logging(args.output_dir, 0, name="svm_voc.log")
    log.info("VOC07 SVM: %s, %s, costs %s, feature dim %d", args.arch, "low-shot" if args.low_shot else "full",
             args.cost, feat_dim(args.arch))
    results = run(args)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
