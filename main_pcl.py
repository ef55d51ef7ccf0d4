#!/usr/bin/env python
"""PCL v1/v2 pretraining (salesforce/PCL ``main_pcl.py`` flags; disco_pcl_evals.md B2-B7).

    python main_pcl.py -a resnet50 --lr 0.03 --batch-size 256 --temperature 0.2 \
        --mlp --aug-plus --cos \
        --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 \
        --exp-dir experiment_pcl /path/to/imagenet

v1 = without ``--mlp --aug-plus --cos``. ``-b`` is the batch of one node (split over its processes);
the lr is not scaled. ``--pcl-r`` is the queue length and the number of negative prototypes. From
``--warmup-epoch`` on, every epoch starts with an E-step (k-means of the momentum encoder's features
for every K of ``--num-cluster``). Checkpoints ``checkpoint_{epoch:04d}.pth.tar`` every 5 epochs (and
the last) in ``--exp-dir``.
"""
from __future__ import annotations

import argparse
import logging
import os

from src import distributed as D
from src import sanity
from src.cli import (HelpFormatter, add_engine_args, add_moco_script_args, engine_config, knn_monitor, moco_two_crops,
                     per_process, prepare_data, print_setup, workers_per_process)
from src.data import small
from src.engine import CheckpointPolicy, Trainer, seed_everything
from src.errors import cli_main
from src.logger import save_args, setup_logging
from src.methods.pcl import PCL, check_pcl_setup, parse_num_cluster
from src.models.backbones import arch_spec
from src.models.momentum import default_shuffle_groups
from src.models.queue import check_queue_divisible

log = logging.getLogger("ssl")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PCL pretraining", formatter_class=HelpFormatter)
    add_moco_script_args(p, arch_help="backbone (any registered arch)", print_freq=100, resume_where="--exp-dir",
                         dist_url_default="tcp://localhost:10001")
    p.add_argument("--low-dim", "--low_dim", dest="low_dim", default=128, type=int, help="embedding dimension")
    p.add_argument("--pcl-r", "--pcl_r", dest="pcl_r", default=16384, type=int,
                   help="queue length and number of negative prototypes (must be < K - batch per process)")
    p.add_argument("--moco-m", "--moco_m", dest="moco_m", default=0.999, type=float, help="momentum of the key encoder (EMA)")
    p.add_argument("--temperature", default=0.2, type=float, help="InfoNCE τ, also the mean of the concentrations φ")
    p.add_argument("--mlp", action="store_true", help="MLP head (PCL v2)")
    p.add_argument("--aug-plus", "--aug_plus", dest="aug_plus", action="store_true", help="MoCo v2 augmentation (PCL v2)")
    p.add_argument("--cos", action="store_true", help="per-epoch cosine lr (PCL v2)")
    p.add_argument("--num-cluster", "--num_cluster", dest="num_cluster", default="25000,50000,100000", type=str,
                   help="comma-separated numbers of clusters, one k-means each")
    p.add_argument("--warmup-epoch", "--warmup_epoch", dest="warmup_epoch", default=20, type=int,
                   help="epochs of InfoNCE only, before the first E-step")
    p.add_argument("--exp-dir", "--exp_dir", dest="exp_dir", default="experiment_pcl",
                   help="checkpoints and logs (--output_dir is an alias)")
    p.add_argument("--shuffle_bn_groups", default=0, type=int,
                   help="single process: emulate shuffle-BN with this many BN groups (0: one per 32 images, max 8)")
    add_engine_args(p, output_default="experiment_pcl")
    return p


def build_method(args: argparse.Namespace, info: D.DistInfo, batch: int, num_samples: int):
    """(method on the device, SGD over ``encoder_q``, lr schedule) for a per-process ``batch`` and a
    dataset of ``num_samples`` images; scripts/benchmark_train.py builds the method with this too."""
    import torch

    from src.optim import MoCoEpochLR
    groups = args.shuffle_bn_groups or default_shuffle_groups(batch)
    method = PCL(args.arch, num_samples, parse_num_cluster(args.num_cluster), args.low_dim, args.pcl_r, args.moco_m,
                 args.temperature, args.mlp, args.warmup_epoch, cifar_stem=args.cifar_stem,
                 shuffle_groups=groups).to(info.device)
    optimizer = torch.optim.SGD(method.encoder_q.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    return method, optimizer, MoCoEpochLR(args.lr, args.epochs, args.cos, args.schedule)


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    out = args.output_dir
    setup_logging(out, info.rank)
    seed_everything(args.seed if args.seed is not None else 0)
    batch = per_process(args.batch_size, info)
    workers = workers_per_process(args.workers, info)
    check_queue_divisible(args.pcl_r, batch * info.world_size, "--pcl-r")
    num_cluster = parse_num_cluster(args.num_cluster)
    train_set = small.pretraining_set(args, args.data, moco_two_crops(args))
    eval_set = small.pretraining_set(args, args.data, small.eval_tf(args))  # same images, same indices (B5)
    check_pcl_setup(args.pcl_r, num_cluster, batch, len(train_set))
    method, optimizer, schedule = build_method(args, info, batch, len(train_set))
    method.set_eval_data(eval_set, 5 * batch, workers)
    print_setup(info, batch, f"lr {args.lr} (not scaled)",
                "cosine per epoch" if args.cos else f"x0.1 at epochs {args.schedule}")
    log.info("PCL %s: r %d, K %s, warm-up %d epochs, τ %g", "v2" if args.mlp else "v1", args.pcl_r, num_cluster,
             args.warmup_epoch, args.temperature)
    if info.is_main:
        save_args(args, out)
    policy = CheckpointPolicy(out, should_save=lambda e, n: (e + 1) % 5 == 0)
    cfg = engine_config(args, batch_size=batch, output_dir=out, checkpoint=policy, method_name="pcl", workers=workers)
    knn = knn_monitor(args, args.data, workers=workers)
    sanity.report(info, small.describe(args), sanity.amp_notice(args, info.device),
                  sanity.lr_warning("pcl", args.lr, batch * info.world_size, "--lr, not scaled"),
                  sanity.image_size_warning(train_set, args.image_size, "--image_size", "training crops"),
                  sanity.knn_image_size_warning(knn, args.image_size))
    Trainer(method, optimizer, schedule, train_set, cfg, info, knn).fit()


@cli_main
def main(argv=None) -> None:
    args = sanity.parse_args(get_parser, argv)
    arch_spec(args.arch)          # fail fast, before any process is spawned
    prepare_data(args, args.data)
    parse_num_cluster(args.num_cluster)
    args.output_dir = args.output_dir or args.exp_dir
    os.makedirs(args.output_dir, exist_ok=True)
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
