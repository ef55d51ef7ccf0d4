#!/usr/bin/env python
"""Weighted k-nearest-neighbour classification on frozen features (src/eval/knn.py; CaCo's kNN monitor,
DINO's ``eval_knn.py`` flags).

    python eval_knn.py -a resnet50 --pretrained ckpt/checkpoint_0199.pth.tar --nb_knn 10 20 100 200 /data/imagenet
    python eval_knn.py -a resnet50 --pretrained moco_v2_r50_e800 /data/imagenet   # a zoo name (or a URL)
    torchrun --nproc_per_node 8 eval_knn.py --data_path /data/imagenet --arch resnet50 --pretrained ...

    # lightly's CIFAR-10 benchmark protocol (k=200, t=0.1) on the CIFAR-10 train / test splits
    python eval_knn.py -a resnet18 --pretrained ckpt.pth.tar --dataset cifar10 --knn_protocol lightly /data/cifar

Bank: L2-normalised features of ``<data>/train``; queries: ``<data>/val``; both with the evaluation
transform (Resize(size·256/224) + CenterCrop(size)). ``--dataset cifar10|cifar100|stl10``: bank = the
train split, queries = the test split, at the images' own size with the small-image preset's
normalisation (docs/small_images.md). Each of the k nearest bank images (cosine similarity s) votes
for its class with weight exp(s/T). Extraction is sharded over the processes and gathered, so every
process holds the same features and prints the same numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

from src import distributed as D
from src import sanity, zoo
from src.checkpoint import backbone_or_random
from src.cli import HelpFormatter, prepare_data, resolve_data_arg, train_dir
from src.data import small
from src.data.datasets import ImageDataset
from src.data.transforms import IMAGENET_STD, SWAV_STD
from src.errors import UserError, cli_main
from src.eval.features import extract_features
from src.eval.knn import knn_accuracy
from src.eval.linear_data import restrict_classes
from src.logger import setup_logging
from src.models.backbones import arch_spec

log = logging.getLogger("ssl")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Weighted kNN evaluation on a frozen backbone", formatter_class=HelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None, help="dataset root: the bank is DIR/train, the queries DIR/val")
    p.add_argument("--data", "--data_path", dest="data_opt", default=None, help="same as DIR (DIR/train, DIR/val)")
    p.add_argument("-a", "--arch", default="resnet50", help="backbone architecture")
    p.add_argument("--pretrained", "--pretrained_weights", dest="pretrained", default="",
                   help="checkpoint (any known layout): a path, an http(s) URL or a zoo name (python -m src.zoo "
                        "list; downloaded once into $SSL_CACHE); empty: random backbone")
    p.add_argument("--cifar_stem", action="store_true", help="random backbone only (a checkpoint's stem is detected)")
    p.add_argument("--nb_knn", "--k", "--knn_k", dest="nb_knn", nargs="+", default=[20],
                   help="number(s) of neighbours, e.g. 10 20 100 200")
    p.add_argument("--temperature", "--knn_t", "-t", dest="temperature", type=float, default=0.2,
                   help="T of the exp(s/T) vote weights")
    p.add_argument("-b", "--batch_size", "--batch-size", "--batch_size_per_gpu", dest="batch_size", type=int,
                   default=128, help="feature-extraction batch per process")
    p.add_argument("-j", "--workers", "--num_workers", dest="workers", type=int, default=4,
                   help="data loading workers per process")
    p.add_argument("--image_size", type=int, default=224,
                   help="eval crop in px (Resize(size*256/224) + CenterCrop; larger than the images upsamples "
                        "them, with a warning)")
    p.add_argument("--swav_std", type=D.str2bool, default=False, help="Normalize with std 0.228 (LORAC/SwAV)")
    p.add_argument("--data_name", choices=["imagenet100", "imagenet1000"], default=None,
                   help="imagenet100: the first 100 class folders; None: every class")
    p.add_argument("--train_list", default=None, help="file list restricting the bank (e.g. a 1%% split; None: every train image)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random backbone's initialisation")
    g = p.add_argument_group("small images")
    small.add_dataset_args(g)
    small.add_knn_protocol_arg(g)
    p.add_argument("--dump_path", "--output_dir", dest="dump_path", default=None,
                   help="write knn_results.json here (None: print only)")
    D.add_dist_args(p)
    return p


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    setup_logging(None, info.rank)
    tf = small.eval_tf(args, SWAV_STD if args.swav_std else IMAGENET_STD)
    if small.is_small_dataset(args):
        bank_set, query_set = small.knn_splits(args, args.data, tf)
    else:
        n = 100 if args.data_name == "imagenet100" else None
        bank_set = ImageDataset(os.path.join(args.data, "train"), tf, file_list=args.train_list,
                                num_classes=None if args.train_list else n)
        query_set = restrict_classes(ImageDataset(os.path.join(args.data, "val"), tf), bank_set.classes)
    net = backbone_or_random(args.pretrained, args.arch, seed=args.seed, cifar_stem=args.cifar_stem, what="kNN on")
    net = net.to(info.device).eval()
    sanity.report(info, small.describe(args),
                  sanity.image_size_warning(bank_set, args.image_size, "--image_size", "kNN bank"))
    log.info("bank %d images, queries %d images, %d classes, %d processes", len(bank_set), len(query_set),
             len(bank_set.classes), info.world_size)
    bank, bank_y = extract_features(net, bank_set, args.batch_size, args.workers, info.device, gather=False)
    q, q_y = extract_features(net, query_set, args.batch_size, args.workers, info.device)
    results = {"arch": args.arch, "pretrained": args.pretrained, "pretrained_source": args.pretrained_source,
               "temperature": args.temperature, "dataset": small.dataset_name(args), "knn_protocol": args.knn_protocol,
               "bank_images": len(bank_set), "query_images": len(query_set), "knn": {}}
    for k in args.nb_knn:
        top1, top5 = knn_accuracy(bank, bank_y, q, q_y, len(bank_set.classes), k, args.temperature, sharded=True)
        results["knn"][str(k)] = {"top1": top1, "top5": top5}
        if info.is_main:
            print(f"{k}-NN classifier result: Top1: {top1:.2f}, Top5: {top5:.2f}", flush=True)
    if info.is_main:
        print(json.dumps(results), flush=True)
        if args.dump_path:
            os.makedirs(args.dump_path, exist_ok=True)
            with open(os.path.join(args.dump_path, "knn_results.json"), "w") as f:
                json.dump(results, f, indent=2)


def _split_trailing_dir(args: argparse.Namespace) -> None:
    """``--nb_knn 10 20 /data``: argparse hands the data directory to ``--nb_knn``; take it back."""
    ks = [str(k) for k in args.nb_knn]
    if ks and not ks[-1].lstrip("-").isdigit() and args.data is None:
        args.data = ks.pop()
    bad = [k for k in ks if not k.lstrip("-").isdigit()]
    if bad or not ks:
        raise UserError(f"--nb_knn takes integers (got {' '.join(map(str, args.nb_knn))})")
    args.nb_knn = [int(k) for k in ks]


@cli_main
def main(argv=None) -> None:
    args = sanity.parse_args(get_parser, argv)
    _split_trailing_dir(args)
    resolve_data_arg(args)
    arch_spec(args.arch)
    prepare_data(args, args.data)
    if not small.is_small_dataset(args):
        train_dir(args.data, "val")
    if any(k <= 0 for k in args.nb_knn):
        raise UserError("--nb_knn values must be positive")
    args.pretrained_source = args.pretrained
    # a URL or zoo name is downloaded here, before any process starts
    args.pretrained = zoo.resolve_arg(args.pretrained, "--pretrained", args.arch)
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
