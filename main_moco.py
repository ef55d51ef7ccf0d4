#!/usr/bin/env python
"""MoCo v1/v2 pretraining (facebookresearch/moco ``main_moco.py`` flags, plus DisCo's ``--hidden``).

    python main_moco.py -a resnet50 --lr 0.03 --batch-size 256 --mlp --moco-t 0.2 --aug-plus --cos \
        --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 /path/to/imagenet

``-b`` is the batch of one node (split over its processes); the lr is not scaled. Checkpoints
``checkpoint_{epoch:04d}.pth.tar`` (keys ``epoch arch state_dict optimizer`` + ours) are written to
``--output_dir`` (default: the current directory, like the official script) every epoch.
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
from src.methods.moco import MoCo
from src.models.backbones import arch_spec
from src.models.momentum import default_shuffle_groups
from src.models.queue import check_queue_divisible

log = logging.getLogger("ssl")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MoCo v1/v2 pretraining", formatter_class=HelpFormatter)
    add_moco_script_args(p)
    p.add_argument("--moco-dim", "--moco_dim", dest="moco_dim", default=128, type=int, help="embedding dim")
    p.add_argument("--moco-k", "--moco_k", dest="moco_k", default=65536, type=int,
                   help="queue length; must be divisible by the global batch")
    p.add_argument("--moco-m", "--moco_m", dest="moco_m", default=0.999, type=float, help="EMA momentum of the key encoder")
    p.add_argument("--moco-t", "--moco_t", dest="moco_t", default=0.07, type=float, help="InfoNCE temperature")
    p.add_argument("--mlp", action="store_true", help="MLP head (MoCo v2)")
    p.add_argument("--aug-plus", "--aug_plus", dest="aug_plus", action="store_true", help="MoCo v2 augmentation")
    p.add_argument("--cos", action="store_true", help="per-epoch cosine lr")
    p.add_argument("--hidden", default=None, type=int,
                   help="DisCo moco/: MLP hidden width; -1 = feature dim (the default), 0 = a single linear layer")
    p.add_argument("--zero_init_residual", "--zero-init-residual", type=D.str2bool, default=None,
                   help="zero-init the last BN of each ResNet residual block (None: on when --hidden is given, "
                        "as DisCo's moco/ baselines whose vendored timm ResNets do it; off otherwise, as "
                        "facebookresearch/moco's torchvision ResNets)")
    p.add_argument("--shuffle_bn_groups", default=0, type=int,
                   help="single process: emulate shuffle-BN with this many BN groups (0: one per 32 images, max 8)")
    add_engine_args(p, knn_root="DIR")
    return p


def zero_init_residual(args: argparse.Namespace) -> bool:
    """``--zero_init_residual``, by default on exactly for DisCo's baselines (``--hidden`` given)."""
    return args.hidden is not None if args.zero_init_residual is None else args.zero_init_residual


def build_method(args: argparse.Namespace, info: D.DistInfo, batch: int):
    """(method on the device, SGD over ``encoder_q``, lr schedule) for a per-process ``batch``; the
    training-speed benchmark (scripts/benchmark_train.py) builds the method with this too."""
    import torch

    from src.optim import MoCoEpochLR
    groups = args.shuffle_bn_groups or default_shuffle_groups(batch)
    zero_init = zero_init_residual(args)
    method = MoCo(args.arch, args.moco_dim, args.moco_k, args.moco_m, args.moco_t, args.mlp, args.hidden,
                  cifar_stem=args.cifar_stem, shuffle_groups=groups, zero_init_residual=zero_init).to(info.device)
    if zero_init and arch_spec(args.arch).family == "resnet":
        log.info("ResNet residual blocks start with their last BN weight at 0 (DisCo moco/ init)")
    optimizer = torch.optim.SGD(method.encoder_q.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    return method, optimizer, MoCoEpochLR(args.lr, args.epochs, args.cos, args.schedule)


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    out = args.output_dir or "."
    setup_logging(out, info.rank)
    seed_everything(args.seed if args.seed is not None else 0)
    batch = per_process(args.batch_size, info)
    workers = workers_per_process(args.workers, info)
    check_queue_divisible(args.moco_k, batch * info.world_size)
    train_set = small.pretraining_set(args, args.data, moco_two_crops(args))
    method, optimizer, schedule = build_method(args, info, batch)
    print_setup(info, batch, f"lr {args.lr} (not scaled)",
                "cosine per epoch" if args.cos else f"x0.1 at epochs {args.schedule}")
    if info.is_main:
        save_args(args, out)
    knn = knn_monitor(args, args.data, workers=workers)
    sanity.report(info, small.describe(args), sanity.amp_notice(args, info.device),
                  sanity.lr_warning("moco", args.lr, batch * info.world_size, "--lr, not scaled"),
                  sanity.image_size_warning(train_set, args.image_size, "--image_size", "training crops"),
                  sanity.knn_image_size_warning(knn, args.image_size))
    cfg = engine_config(args, batch_size=batch, output_dir=out, checkpoint=CheckpointPolicy(out),
                        method_name="moco", workers=workers)
    Trainer(method, optimizer, schedule, train_set, cfg, info, knn).fit()


@cli_main
def main(argv=None) -> None:
    args = sanity.parse_args(get_parser, argv)
    arch_spec(args.arch)          # fail fast, before any process is spawned
    prepare_data(args, args.data)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
