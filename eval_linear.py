#!/usr/bin/env python
"""Linear classification on a frozen backbone: the protocols of MoCo/DisCo ``main_lincls.py``,
LORAC/SwAV ``eval_linear.py``, SogCLR ``lincls.py``, CaCo ``linear.py`` and PCL ``eval_cls_imagenet.py``.

    # MoCo / DisCo (positional data dir, -b per node)
    python eval_linear.py -a resnet50 --lr 30 -b 256 --pretrained ckpt/checkpoint_0199.pth.tar \
        --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 /data/imagenet
    # LORAC (per-GPU --batch_size, std 0.228)
    torchrun --nproc_per_node 4 eval_linear.py --data_path /data/imagenet --arch resnet50 --lr 6.0 \
        --scheduler_type step --dump_path lincls --pretrained exp/checkpoint.pth.tar --batch_size 512 --wd 0.0

    # a released checkpoint by zoo name (python -m src.zoo list) or URL, downloaded once into $SSL_CACHE
    python eval_linear.py --protocol pcl -a resnet50 --pretrained pcl_v2_r50_e200 /data/imagenet

``--protocol {moco,disco,pcl,lorac,swav,sogclr,caco}`` picks the paper's recipe (table in
``src/eval/linear_presets.py`` and the README); explicit flags override it; without it the protocol is
inferred from the seed command's spelling (or, when the spelling names none, from the zoo entry of
``--pretrained``) and printed. Results (``checkpoint.pth.tar`` of the head,
``log.jsonl``, ``results.json``) go to ``--dump_path`` (default ``./linear_eval``), never into the
pretraining directory. Data: ``<data>/train`` and ``<data>/val`` (``--train_list`` for a 1 %/10 %
subset, ``--data_name imagenet100`` for the first 100 classes, ``--dataset cifar10|cifar100|stl10``
for torchvision's CIFAR batches or STL-10's binary folder under ``<data>``: train → test split).
``--mi_every N`` adds DisCo's "BI analysis" (src/eval/mutual_info.py) to the log.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass

import torch

from src import distributed as D
from src import sanity, zoo
from src.checkpoint import link_or_copy, save_atomic
from src.cli import HelpFormatter, amp_mode, resolve_data_arg, train_dir
from src.engine import StopSignal, TrainStep, seed_everything
from src.errors import UserError, cli_main
from src.eval import linear as L
from src.data.small import SMALL_DATASETS, check_files
from src.eval.linear_data import imagenet_datasets, small_datasets
from src.eval.linear_presets import PRESETS, Recipe, infer_protocol, resolve_recipe, used_options
from src.eval.mutual_info import MiTracker
from src.logger import RunLogger, save_args, setup_logging
from src.models.backbones import arch_spec

log = logging.getLogger("ssl")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Linear evaluation on a frozen backbone (flags of the official "
                                "lincls/eval_linear scripts; None = the protocol preset)", formatter_class=HelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None, help="dataset root: DIR/train for training, DIR/val for evaluation")
    p.add_argument("--data", "--data_path", dest="data_opt", default=None, help="same as DIR (SogCLR/CaCo, LORAC): <--data>/train and <--data>/val")
    p.add_argument("--protocol", choices=sorted(PRESETS), default=None,
                   help="recipe preset (None: inferred from the flag spellings, see src/eval/linear_presets.py)")
    p.add_argument("--dataset", default="imagenet", type=str.lower, choices=["imagenet", "folder", *SMALL_DATASETS],
                   help="imagenet (= folder): DIR/train and DIR/val; cifar10/cifar100: torchvision CIFAR batches under "
                        "DIR (DisCo cifar_main_lincls.py); stl10: DIR/stl10_binary (5,000 labelled train / 8,000 "
                        "test), with the same recipe")
    p.add_argument("--data_name", choices=["imagenet100", "imagenet1000"], default=None,
                   help="SogCLR: imagenet100 = the first 100 class folders (None: every class)")
    p.add_argument("--train_list", default=None, help="file list of the training subset (SimCLR 1%%/10%% split, "
                   "or '<relative path> [label]' lines; None: every train image)")
    p.add_argument("-a", "--arch", default="resnet50", help="backbone architecture")
    p.add_argument("--pretrained", default="", help="pretraining checkpoint (any known layout): a path, an http(s) URL "
                   "or a zoo name (python -m src.zoo list; downloaded once into $SSL_CACHE); empty: random backbone")
    p.add_argument("--model_prefix", default=None, help="LORAC: accepted (None); the key layout is detected automatically")
    p.add_argument("--cifar_stem", action="store_true", help="random backbone only (a checkpoint's stem is detected)")
    p.add_argument("--global_pooling", type=D.str2bool, default=True, help="average-pool the last feature map (true/false)")
    p.add_argument("--use_bn", type=D.str2bool, default=False, help="BatchNorm before the linear head (true/false)")
    p.add_argument("--num_classes", type=int, default=None, help="classifier outputs (None: the classes of the data)")
    g = p.add_argument_group("optimisation (default None = protocol preset)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs")
    g.add_argument("--start-epoch", "--start_epoch", dest="start_epoch", type=int, default=0,
                   help="ignored: the epoch comes from the resumed checkpoint")
    g.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                   help="batch per node (moco/disco/pcl/caco), per process (lorac) or global (sogclr)")
    g.add_argument("--lr", "--learning-rate", "--learning_rate", dest="lr", type=float, default=None,
                   help="base lr: scaled by b/256 for sogclr/caco, not scaled for the others")
    g.add_argument("--schedule", "--decay_epochs", dest="schedule", type=int, nargs="*", default=None,
                   help="step milestones (an empty list = constant lr)")
    g.add_argument("--gamma", type=float, default=None, help="step factor")
    g.add_argument("--scheduler_type", choices=["step", "cosine", "constant"], default=None, help="lr schedule per epoch")
    g.add_argument("--cos", action="store_true", help="per-epoch cosine (same as --scheduler_type cosine)")
    g.add_argument("--final_lr", type=float, default=None, help="cosine end value, not scaled (None: 0)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", "--weight-decay", "--weight_decay", dest="wd", type=float, default=None, help="weight decay")
    g.add_argument("--nesterov", type=D.str2bool, nargs="?", const=True, default=False, help="Nesterov momentum")
    g.add_argument("--optimizer", choices=["sgd", "larc"], default=None, help="optimiser of the head")
    g.add_argument("--std", type=float, nargs=3, default=None, help="Normalize std (lorac preset: 0.228 0.224 0.225)")
    p.add_argument("-j", "--workers", type=int, default=None, help="data loading workers (per node, or per process for lorac)")
    p.add_argument("--val_batch_size", type=int, default=None, help="evaluation batch per process (None: 256)")
    p.add_argument("-p", "--print-freq", "--print_freq", dest="print_freq", type=int, default=10, help="log every N iterations")
    p.add_argument("--resume", default="",
                   help="head checkpoint, a path or URL (empty: <dump_path>/checkpoint.pth.tar if present)")
    p.add_argument("-e", "--evaluate", action="store_true", help="only evaluate the (resumed) head on val")
    p.add_argument("--seed", type=int, default=None, help="head init and data order seed (None: 0)")
    p.add_argument("--dump_path", "--output_dir", "--output-dir", dest="dump_path", default=None,
                   help="output directory (None: ./linear_eval; SogCLR --save_dir and PCL --id derive one)")
    p.add_argument("--save_dir", default=None, help="SogCLR: output under <save_dir>/linear_eval_<pretraining dir> (None: not used)")
    p.add_argument("--id", default=None, help="PCL: run name, output under ./linear_eval/<id> (None: not used)")
    p.add_argument("--checkpoint_freq", type=int, default=10, help="copy the head to checkpoints/ckp-<epoch>.pth")
    p.add_argument("--image_size", type=int, default=224, help="crop size in px (eval resize = size*256/224; larger than the images upsamples them, with a warning)")
    p.add_argument("--max_iters", type=int, default=None, help="training iterations per epoch cap (smoke tests; None: no cap)")
    p.add_argument("--use_fp16", "--use-fp16", dest="use_fp16", type=D.str2bool, nargs="?", const=True, default=False,
                   help="fp16 autocast + GradScaler on CUDA (fp32 on CPU; true/false)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    g = p.add_argument_group("DisCo BI analysis (binned mutual information of the classifier's outputs, docs/visualization.md)")
    g.add_argument("--mi_every", type=int, default=0,
                   help="I(X;T), I(T;Y) every N training iterations, first one included, into log.jsonl (0: off)")
    g.add_argument("--mi_samples", type=int, default=1000, help="training images of the estimate (fixed, eval transform)")
    g.add_argument("--mi_bins", type=int, default=30, help="bins per softmax output on [0, 1]")
    D.add_dist_args(p, dist_url_default="tcp://224.66.41.62:23456")
    return p


def resolve_paths(args: argparse.Namespace) -> None:
    """Data root, checkpoints (a path, URL or zoo name → a local file: downloaded here, before any
    process starts; ``args.pretrained_source`` keeps what was given) and the output directory."""
    resolve_data_arg(args)
    if not os.path.isdir(args.data):
        raise UserError(f"data directory not found: {args.data}")
    args.pretrained_source = args.pretrained
    entry = zoo.zoo_entry(args.pretrained)
    args.pretrained = zoo.resolve_arg(args.pretrained, "--pretrained", args.arch)
    args.resume = zoo.resolve_arg(args.resume, "--resume")
    if args.dump_path is None:
        if args.save_dir:
            parent = entry.name if entry else (os.path.basename(os.path.dirname(os.path.abspath(args.pretrained)))
                                               if args.pretrained else "random")
            args.dump_path = os.path.join(args.save_dir, f"linear_eval_{parent}")
        elif args.id:
            args.dump_path = os.path.join("linear_eval", args.id)
        else:
            args.dump_path = "linear_eval"
    L.check_dump_path(args.dump_path, args.pretrained)


def build_data(args: argparse.Namespace, std, seed: int):
    if args.dataset in SMALL_DATASETS:
        return small_datasets(args.data, args.dataset, args.image_size, std, seed)
    n = 100 if args.data_name == "imagenet100" else None
    return imagenet_datasets(args.data, args.image_size, std, args.train_list, n, seed)


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    setup_logging(args.dump_path, info.rank, name="linear.log")
    r = resolve_recipe(args, args.protocol_resolved, info.world_size, info.local_world_size)
    log.info("%s (protocol from %s)", r.describe(), args.protocol_reason)
    log.info("processes %d (device %s) | output %s", info.world_size, info.device, os.path.abspath(args.dump_path))
    seed = args.seed if args.seed is not None else 0
    seed_everything(seed)
    train_set, val_set = build_data(args, r.std, seed)
    n_cls = args.num_classes or len(train_set.classes)
    if n_cls < len(train_set.classes):
        raise UserError(f"--num_classes {n_cls} is smaller than the {len(train_set.classes)} classes of the data")
    log.info("train %d images, val %d images, %d classes", len(train_set), len(val_set), len(train_set.classes))
    sanity.report(info, sanity.amp_notice(args, info.device),
                  sanity.image_size_warning(train_set, args.image_size, "--image_size", "linear-probe crops"))
    dev = info.device
    backbone = L.frozen_backbone(args.pretrained, args.arch, cifar_stem=args.cifar_stem,
                                 global_pooling=args.global_pooling).to(dev)
    detected = getattr(backbone, "loaded_prefix", None)
    if args.model_prefix and detected is not None and detected.rstrip(".") != args.model_prefix.rstrip("."):
        log.info("--model_prefix %s ignored: the checkpoint layout %r was detected and fully loaded",
                 args.model_prefix, detected)
    reference = L.snapshot(backbone)
    fdim = arch_spec(args.arch).feat_dim
    msize = 1 if args.global_pooling else L.feature_map_size(backbone, fdim, args.image_size, dev)
    head = L.LinearClassifier(fdim, n_cls, args.global_pooling, args.use_bn, msize).to(dev)
    optimizer = L.build_optimizer(head.parameters(), r)
    model = head
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(head, device_ids=[dev] if dev.type == "cuda" else None)
    step = TrainStep(optimizer, dev, amp_mode(args))
    start, start_it, consumed, best, best_epoch = 0, 0, 0, -1.0, -1
    ck_path = args.resume or os.path.join(args.dump_path, "checkpoint.pth.tar")
    if os.path.isfile(ck_path):
        ck = L.load_head(ck_path, head, optimizer, step.scaler)
        start, best, best_epoch = int(ck["epoch"]), float(ck["best_acc1"]), int(ck["best_epoch"])
        start_it = int(ck.get("iter", 0))
        consumed = start_it * int(ck.get("per_process_batch", r.per_process_batch)) * int(ck.get("world_size", 1))
        if start_it:
            start_it = consumed // (r.per_process_batch * info.world_size)
        log.info("resumed the linear head from %s at epoch %d%s (best top-1 %.2f)", ck_path, start,
                 f" iteration {start_it}" if start_it else "", best)
    logger = RunLogger(args.dump_path, active=info.is_main)
    if info.is_main:
        save_args(args, args.dump_path, "linear_args.json")
    mi = None
    if args.mi_every:
        mi = MiTracker(train_set, val_set.transform, backbone, model, logger, args.mi_every, args.mi_samples,
                       L.epoch_iterations(len(train_set), r.per_process_batch, info.world_size, args.max_iters),
                       r.val_batch_size, r.workers, dev, seed, args.mi_bins)
    results = {"protocol": r.protocol, "arch": args.arch, "pretrained": args.pretrained,
               "pretrained_source": args.pretrained_source, "lr": r.lr,
               "global_batch": r.global_batch, "epochs": r.epochs, "resumed_from_epoch": start}
    probe = Probe(args, info, r, backbone, model, optimizer, step, train_set, val_set, logger, results, reference,
                  start, start_it, consumed, best, best_epoch,
                  {"arch": args.arch, "protocol": r.protocol, "num_classes": n_cls, "per_process_batch": r.per_process_batch},
                  mi)
    with StopSignal(10) as stop:
        try:
            if args.evaluate:
                evaluate(probe)
            else:
                train(probe, stop, seed)
        finally:
            logger.close()


@dataclass
class Probe:
    """Everything one linear evaluation run works with."""
    args: argparse.Namespace
    info: D.DistInfo
    r: Recipe
    backbone: torch.nn.Module
    model: torch.nn.Module       # the head (DDP-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    step: TrainStep
    train_set: object
    val_set: object
    logger: RunLogger
    results: dict
    reference: dict              # backbone snapshot for the sanity check
    start: int                   # epoch to run next
    start_it: int                # iterations of it already done (a stop in the middle of an epoch)
    consumed: int                # images of that epoch already read, over all processes
    best: float
    best_epoch: int
    meta: dict
    mi: MiTracker | None = None  # --mi_every

    @property
    def ck_file(self) -> str:
        return os.path.join(self.args.dump_path, "checkpoint.pth.tar")

    def save(self, epoch: int, next_iter: int = 0) -> None:
        if self.info.is_main:
            save_atomic(L.head_state(self.model, self.optimizer, epoch, self.best, self.best_epoch, vars(self.args),
                                     self.meta, next_iter, self.step.scaler), self.ck_file)
        D.barrier()

    def validate(self) -> dict:
        return L.validate(self.backbone, self.model, self.val_set, self.r.val_batch_size, self.r.workers,
                          self.info.device)


def evaluate(p: Probe) -> None:
    m = p.validate()
    log.info("evaluation: top-1 %.2f top-5 %.2f loss %.4f on %d images", m["acc1"], m["acc5"], m["loss"], m["n"])
    p.results.update(eval_acc1=m["acc1"], eval_acc5=m["acc5"], eval_loss=m["loss"], val_images=m["n"])
    _write_results(p.info, p.args.dump_path, p.results, "eval_results.json")


def train(p: Probe, stop: StopSignal, seed: int) -> None:
    """The epochs of the probe: train (the engine's step, stop polls), validate, checkpoint. A stop
    signal writes the head checkpoint (mid-epoch: with its iteration) and returns."""
    args, r, dev = p.args, p.r, p.info.device
    loader, sampler = L.make_train_loader(p.train_set, r.per_process_batch, r.workers, dev, seed)
    v = None
    for epoch in range(p.start, r.epochs):
        first = epoch == p.start
        sampler.set_epoch(epoch, p.consumed if first else 0)
        lr = L.epoch_lr(r, epoch)
        t = L.train_one_epoch(p.backbone, p.model, loader, p.step, lr, epoch, dev, args.max_iters, args.print_freq,
                              stop, p.start_it if first else 0, p.mi.after_step if p.mi else None)
        if t.get("interrupted"):
            p.save(epoch, int(t["next_iter"]))
            log.warning("stopped at epoch %d iteration %d (checkpoint %s); run the same command again to resume",
                        epoch, int(t["next_iter"]), p.ck_file)
            return
        v = p.validate()
        if v["acc1"] > p.best:
            p.best, p.best_epoch = v["acc1"], epoch
        log.info("epoch %d: lr %.4g train loss %.4f top-1 %.2f | val loss %.4f top-1 %.2f top-5 %.2f | best %.2f",
                 epoch, lr, t["loss"], t["acc1"], v["loss"], v["acc1"], v["acc5"], p.best)
        p.logger.write({"epoch": epoch, "lr": lr, "train_loss": t["loss"], "train_acc1": t["acc1"],
                        "train_acc5": t["acc5"], "val_loss": v["loss"], "val_acc1": v["acc1"],
                        "val_acc5": v["acc5"], "best_acc1": p.best}, step=epoch, prefix="linear/")
        p.save(epoch + 1)
        if p.info.is_main and args.checkpoint_freq and (epoch + 1) % args.checkpoint_freq == 0:
            os.makedirs(os.path.join(args.dump_path, "checkpoints"), exist_ok=True)
            link_or_copy(p.ck_file, os.path.join(args.dump_path, "checkpoints", f"ckp-{epoch}.pth"))
        if epoch + 1 < r.epochs and stop.poll():
            log.warning("stopped after epoch %d (checkpoint %s); run the same command again to resume",
                        epoch, p.ck_file)
            return
    L.sanity_check(p.backbone, p.reference)
    if v is None:  # resumed at the end: report the stored head
        v = p.validate()
    p.results.update(best_acc1=p.best, best_epoch=p.best_epoch, last_acc1=v["acc1"], last_acc5=v["acc5"],
                     last_val_loss=v["loss"], val_images=v["n"])
    log.info("linear evaluation done: best top-1 %.2f (epoch %d), last top-1 %.2f, last top-5 %.2f",
             p.best, p.best_epoch, v["acc1"], v["acc5"])
    _write_results(p.info, p.args.dump_path, p.results, "results.json")


def _write_results(info: D.DistInfo, dump: str, results: dict, name: str) -> None:
    if info.is_main:
        with open(os.path.join(dump, name), "w") as f:
            json.dump(results, f, indent=2)
        print(json.dumps(results), flush=True)


@cli_main
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = sanity.parse_args(get_parser, argv)
    arch_spec(args.arch)
    entry = zoo.zoo_entry(args.pretrained)
    resolve_paths(args)  # a SwAV checkpoint is recognised from the file (infer_protocol)
    args.protocol_resolved, args.protocol_reason = infer_protocol(args, used_options(argv))
    if entry and args.protocol_reason.startswith("default"):  # the command names no recipe: the paper's
        args.protocol_resolved, args.protocol_reason = entry.protocol, f"zoo entry {entry.name} ({entry.method})"
    resolve_recipe(args, args.protocol_resolved)  # flag errors before any process starts
    if args.mi_every < 0 or (args.mi_every and (args.mi_samples < 1 or args.mi_bins < 1)):
        raise UserError("--mi_every must be >= 0, --mi_samples and --mi_bins >= 1")
    if args.dataset in SMALL_DATASETS:
        check_files(args.dataset, args.data)
    else:
        train_dir(args.data)
    os.makedirs(args.dump_path, exist_ok=True)
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
