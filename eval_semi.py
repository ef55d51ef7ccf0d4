#!/usr/bin/env python
"""Semi-supervised fine-tuning: the whole pretrained network plus a new linear classifier trained on a
labelled 1 %/10 % subset of ImageNet, top-1 and top-5 on the validation set (disco_pcl_evals.md C3; the
recipe of MoPro ``finetune_imagenet.py``, which PCL's authors point to: lr 0.005, ×0.2 at [20, 30],
40 epochs, wd 0, batch 256 per node, RandomResizedCrop + flip, BatchNorm in train mode).

    # SimCLR's 1 % split file (google-research/simclr imagenet_subsets, = DisCo data/1percent.txt)
    python eval_semi.py -a resnet50 --pretrained PCL_v2_epoch200.pth.tar --train_list 1percent.txt \
        --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 /data/imagenet
    # MoPro's seeded random 1 % (the images of a one-process finetune_imagenet.py --seed 0 --low-resource 0.01)
    torchrun --nproc_per_node 8 eval_semi.py -a resnet50 --pretrained ckpt.pth.tar --fraction 0.01 --seed 0 /data/imagenet

Without ``--train_list`` / ``--fraction`` every image of ``<data>/train`` is used (a subset folder
built by ``scripts/make_imagenet_fraction.py``). Outputs in ``--dump_path`` (default ``./semi_eval``):
``checkpoint.pth.tar`` (the whole network as a plain torchvision/timm classifier state dict, with the
optimiser, scaler and position; a stop signal writes it mid-epoch and the same command resumes),
``train_subset.txt`` (the images trained on, reusable as ``--train_list``), ``log.jsonl``, TensorBoard,
``results.json``. docs/semi.md has the choices and the differences from MoPro's script.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from src import distributed as D
from src import sanity
from src.checkpoint import link_or_copy, save_atomic
from src.cli import HelpFormatter, amp_mode, resolve_data_arg, train_dir
from src.engine import StopSignal, TrainStep, seed_everything
from src.errors import UserError, cli_main
from src.eval import linear as L
from src.eval import semi as S
from src.eval.linear_presets import Recipe
from src.logger import RunLogger, save_args, setup_logging
from src.models.backbones import arch_spec, convert_sync_batchnorm, sync_bn_plan

log = logging.getLogger("ssl")
#: fine-tuning has no frozen part: the probe's loop runs ``network(identity(x))`` with gradients everywhere
NO_FROZEN_PART = nn.Identity()


def get_parser() -> argparse.ArgumentParser:
    d = S.DEFAULTS
    p = argparse.ArgumentParser(description="Semi-supervised fine-tuning of the whole network on a labelled subset "
                                "(MoPro finetune_imagenet.py recipe; flags of that script accepted)",
                                formatter_class=HelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None, help="dataset root: DIR/train for training, DIR/val for evaluation")
    p.add_argument("--data", "--data_path", dest="data_opt", default=None, help="same as DIR (MoPro's --data)")
    p.add_argument("-a", "--arch", default="resnet50", help="backbone architecture")
    p.add_argument("--pretrained", "--model-path", "--model_path", dest="pretrained", default="",
                   help="pretraining checkpoint (any known layout; MoPro's --model-path); empty: random init")
    p.add_argument("--cifar_stem", action="store_true", help="random init only (a checkpoint's stem is detected)")
    g = p.add_argument_group("labelled subset (one of them, or every image of DIR/train)")
    g.add_argument("--train_list", default=None, help="file list: SimCLR 1percent.txt/10percent.txt ('<wnid>_<n>.JPEG', "
                   "class = prefix before '_') or '<relative path> [label]' lines (None: not used)")
    g.add_argument("--fraction", "--low-resource", "--low_resource", dest="fraction", type=float, default=None,
                   help="seeded random fraction of DIR/train, e.g. 0.01 (MoPro's --low-resource; None: not used)")
    g.add_argument("--fraction_seed", type=int, default=None, help="seed of the --fraction draw (None: --seed, as MoPro)")
    g.add_argument("--class_balanced", action="store_true", help="--fraction of every class (at least one image each) "
                   "instead of MoPro's uniform draw over all images")
    g = p.add_argument_group("optimisation (MoPro defaults)")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="training epochs")
    g.add_argument("--start-epoch", "--start_epoch", dest="start_epoch", type=int, default=0,
                   help="ignored: the epoch comes from the resumed checkpoint")
    g.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", type=int, default=d["batch_size"],
                   help="batch PER NODE, split over its processes")
    g.add_argument("--lr", "--learning-rate", "--learning_rate", dest="lr", type=float, default=d["lr"],
                   help="lr of every parameter, backbone and new classifier alike (not scaled by the batch)")
    g.add_argument("--schedule", type=int, nargs="*", default=list(d["schedule"]), help="lr step epochs (empty: constant)")
    g.add_argument("--decay-rate", "--decay_rate", "--gamma", dest="gamma", type=float, default=d["gamma"],
                   help="lr factor at each --schedule epoch")
    g.add_argument("--cos", action="store_true", help="per-epoch cosine to 0 instead of the steps")
    g.add_argument("--momentum", type=float, default=d["momentum"], help="SGD momentum")
    g.add_argument("--wd", "--weight-decay", "--weight_decay", dest="wd", type=float, default=d["wd"], help="weight decay")
    g.add_argument("--sync_bn", choices=["none", "pytorch", "apex"], default="none",
                   help="SyncBatchNorm over the processes (GPU only; MoPro: none)")
    g.add_argument("--syncbn_process_group_size", type=int, default=8, help="process group size of --sync_bn apex")
    p.add_argument("-j", "--workers", type=int, default=d["workers"], help="data loading workers per node")
    p.add_argument("--val_batch_size", type=int, default=d["val_batch_size"], help="evaluation batch per process")
    p.add_argument("-p", "--print-freq", "--print_freq", dest="print_freq", type=int, default=10, help="log every N iterations")
    p.add_argument("--resume", default="", help="fine-tuning checkpoint (empty: <dump_path>/checkpoint.pth.tar if present)")
    p.add_argument("-e", "--evaluate", action="store_true", help="only evaluate the (resumed) network on val")
    p.add_argument("--seed", type=int, default=None, help="classifier init, data order and augmentation seed (None: 0)")
    p.add_argument("--dump_path", "--exp-dir", "--exp_dir", "--output_dir", dest="dump_path", default="semi_eval",
                   help="output directory (MoPro's --exp-dir)")
    p.add_argument("--checkpoint_freq", type=int, default=10, help="copy the checkpoint to checkpoints/ckp-<epoch>.pth")
    p.add_argument("--image_size", type=int, default=224, help="crop size in px (eval resize = size*256/224)")
    p.add_argument("--max_iters", type=int, default=None, help="training iterations per epoch cap (smoke tests; None: no cap)")
    p.add_argument("--use_fp16", "--use-fp16", dest="use_fp16", type=D.str2bool, nargs="?", const=True, default=False,
                   help="fp16 autocast + GradScaler on CUDA (fp32 on CPU; true/false)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    D.add_dist_args(p, dist_url_default="tcp://224.66.41.62:23456")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Flags and paths, before any process starts (one-line errors)."""
    resolve_data_arg(args)
    train_dir(args.data)
    if args.train_list and args.fraction is not None:
        raise UserError("--train_list and --fraction both choose the labelled subset: give one of them")
    if args.train_list and not os.path.isfile(args.train_list):
        raise UserError(f"--train_list file not found: {args.train_list}")
    if args.class_balanced and args.fraction is None:
        raise UserError("--class_balanced needs --fraction")
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], not {args.fraction} (1 % is 0.01)")
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, not {args.epochs}")
    if args.pretrained and not os.path.isfile(args.pretrained):
        raise UserError(f"--pretrained checkpoint not found: {args.pretrained}")
    if args.resume and not os.path.isfile(args.resume):
        raise UserError(f"--resume checkpoint not found: {args.resume}")
    if args.evaluate and not (args.resume or os.path.isfile(os.path.join(args.dump_path, "checkpoint.pth.tar"))):
        raise UserError("--evaluate needs a fine-tuned network: --resume PATH or <dump_path>/checkpoint.pth.tar")
    if args.fraction_seed is None:
        args.fraction_seed = args.seed if args.seed is not None else 0
    L.check_dump_path(args.dump_path, args.pretrained, L.FINETUNE_KIND)


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    setup_logging(args.dump_path, info.rank, name="semi.log")
    r = S.finetune_recipe(args, info)
    log.info("%s", r.describe())
    log.info("processes %d (device %s) | output %s", info.world_size, info.device, os.path.abspath(args.dump_path))
    seed = args.seed if args.seed is not None else 0
    seed_everything(seed)
    train_set, val_set, subset = S.finetune_datasets(args, r.std, seed)
    n_cls = len(train_set.classes)
    empty = n_cls - len(set(train_set.targets))
    log.info("labelled subset: %s -> %d images of %d classes%s; val %d images", subset, len(train_set), n_cls,
             f" ({empty} classes without a training image)" if empty else "", len(val_set))
    sanity.report(info, sanity.amp_notice(args, info.device),
                  sanity.image_size_warning(train_set, args.image_size, "--image_size", "fine-tuning crops"),
                  S.single_image_batch_warning(len(train_set), r.per_process_batch, info.world_size))
    dev = info.device
    net = S.build_network(args.pretrained, args.arch, n_cls, cifar_stem=args.cifar_stem)
    reference = S.backbone_params(net, args.arch)  # the pretrained weights, to measure how far fine-tuning moves them
    convert, group, what = sync_bn_plan(args.sync_bn, args.syncbn_process_group_size, dev)
    if convert:
        net = convert_sync_batchnorm(net, process_group=group)
    log.info("BatchNorm: %s", what if args.sync_bn != "none" else "per process (MoPro)")
    net = net.to(dev)
    optimizer = L.build_optimizer(net.parameters(), r)
    model = net
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[dev] if dev.type == "cuda" else None)
    step = TrainStep(optimizer, dev, amp_mode(args))
    run = Run(args, info, r, net, model, optimizer, step, train_set, val_set, reference, S.subset_digest(train_set))
    run.resume()
    run.logger = RunLogger(args.dump_path, active=info.is_main)
    if info.is_main:
        save_args(args, args.dump_path, "semi_args.json")
        S.write_subset_list(train_set, os.path.join(args.dump_path, "train_subset.txt"))
    run.results = {"protocol": "finetune", "arch": args.arch, "pretrained": args.pretrained, "subset": subset,
                   "train_images": len(train_set), "train_classes": n_cls, "classes_without_images": empty,
                   "lr": r.lr, "global_batch": r.global_batch, "epochs": r.epochs, "resumed_from_epoch": run.start}
    with StopSignal(10) as stop:
        try:
            if args.evaluate:
                evaluate(run)
            else:
                train(run, stop, seed)
        finally:
            run.logger.close()


@dataclass
class Run:
    """Everything one fine-tuning run works with, and where it stands."""
    args: argparse.Namespace
    info: D.DistInfo
    r: Recipe
    net: nn.Module               # the network (backbone + new classifier)
    model: nn.Module             # the same, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    step: TrainStep
    train_set: object
    val_set: object
    reference: dict              # pretrained backbone parameters
    digest: str                  # sha256 of the training subset
    start: int = 0               # epoch to run next
    start_it: int = 0            # iterations of it already done (a stop in the middle of an epoch)
    consumed: int = 0            # images of that epoch already read, over all processes
    best: float = -1.0
    best_epoch: int = -1
    best_acc5: float = -1.0
    results: dict | None = None
    logger: RunLogger | None = None

    @property
    def ck_file(self) -> str:
        return os.path.join(self.args.dump_path, "checkpoint.pth.tar")

    def resume(self) -> None:
        """``--resume`` or ``<dump_path>/checkpoint.pth.tar``: the network, optimiser, scaler and position;
        a mid-epoch position is re-mapped when the number of processes or the batch changed."""
        path = self.args.resume or self.ck_file
        if not os.path.isfile(path):
            return
        ck = L.load_head(path, self.model, self.optimizer, self.step.scaler, kind=L.FINETUNE_KIND)
        S.check_run(ck, path, self.train_set.classes, None if self.args.evaluate else self.digest, len(self.train_set))
        self.start, self.best, self.best_epoch = int(ck["epoch"]), float(ck["best_acc1"]), int(ck["best_epoch"])
        self.best_acc5 = float(ck.get("best_acc5", -1.0))
        self.start_it = int(ck.get("iter", 0))
        if self.start_it:
            self.consumed = self.start_it * int(ck["per_process_batch"]) * int(ck.get("world_size", 1))
            self.start_it = self.consumed // (self.r.per_process_batch * self.info.world_size)
        log.info("resumed the fine-tuned network from %s at epoch %d%s (best top-1 %.2f)", path, self.start,
                 f" iteration {self.start_it}" if self.start_it else "", self.best)

    def save(self, epoch: int, next_iter: int = 0) -> None:
        if self.info.is_main:
            meta = {"arch": self.args.arch, "protocol": "finetune", "num_classes": len(self.train_set.classes),
                    "classes": list(self.train_set.classes), "per_process_batch": self.r.per_process_batch,
                    "train_images": len(self.train_set), "subset_sha256": self.digest, "best_acc5": self.best_acc5}
            save_atomic(L.head_state(self.model, self.optimizer, epoch, self.best, self.best_epoch, vars(self.args),
                                     meta, next_iter, self.step.scaler, kind=L.FINETUNE_KIND), self.ck_file)
        D.barrier()

    def validate(self) -> dict:
        """Every process with rank 0's BN statistics (those it saves; DDP's ``broadcast_buffers`` would
        send them at the next forward): after a training step each process holds its own."""
        if self.info.distributed:
            for buf in self.net.buffers():
                D.broadcast_(buf, 0)
        return L.validate(NO_FROZEN_PART, self.model, self.val_set, self.r.val_batch_size, self.r.workers,
                          self.info.device)


def evaluate(run: Run) -> None:
    m = run.validate()
    log.info("evaluation: top-1 %.2f top-5 %.2f loss %.4f on %d images", m["acc1"], m["acc5"], m["loss"], m["n"])
    run.results.update(eval_acc1=m["acc1"], eval_acc5=m["acc5"], eval_loss=m["loss"], val_images=m["n"])
    _write_results(run, "eval_results.json")


def train(run: Run, stop: StopSignal, seed: int) -> None:
    """The epochs: the probe's training loop over the whole network (the engine's step, stop polls),
    validation, checkpoint. A stop signal writes the checkpoint (mid-epoch: with its iteration) and returns."""
    args, r, dev = run.args, run.r, run.info.device
    loader, sampler = L.make_train_loader(run.train_set, r.per_process_batch, r.workers, dev, seed)
    v = None
    for epoch in range(run.start, r.epochs):
        first = epoch == run.start
        sampler.set_epoch(epoch, run.consumed if first else 0)
        lr = L.epoch_lr(r, epoch)
        t = L.train_one_epoch(NO_FROZEN_PART, run.model, loader, run.step, lr, epoch, dev, args.max_iters,
                              args.print_freq, stop, run.start_it if first else 0)
        if t.get("interrupted"):
            run.save(epoch, int(t["next_iter"]))
            log.warning("stopped at epoch %d iteration %d (checkpoint %s); run the same command again to resume",
                        epoch, int(t["next_iter"]), run.ck_file)
            return
        v = run.validate()
        if v["acc1"] > run.best:
            run.best, run.best_epoch = v["acc1"], epoch
        run.best_acc5 = max(run.best_acc5, v["acc5"])
        change = S.relative_change(run.net, run.reference)
        log.info("epoch %d: lr %.4g train loss %.4f top-1 %.2f | val loss %.4f top-1 %.2f top-5 %.2f | best %.2f | "
                 "backbone moved %.3g", epoch, lr, t["loss"], t["acc1"], v["loss"], v["acc1"], v["acc5"], run.best,
                 change)
        run.logger.write({"epoch": epoch, "lr": lr, "train_loss": t["loss"], "train_acc1": t["acc1"],
                          "train_acc5": t["acc5"], "val_loss": v["loss"], "val_acc1": v["acc1"], "val_acc5": v["acc5"],
                          "best_acc1": run.best, "backbone_rel_change": change}, step=epoch, prefix="semi/")
        run.save(epoch + 1)
        if run.info.is_main and args.checkpoint_freq and (epoch + 1) % args.checkpoint_freq == 0:
            os.makedirs(os.path.join(args.dump_path, "checkpoints"), exist_ok=True)
            link_or_copy(run.ck_file, os.path.join(args.dump_path, "checkpoints", f"ckp-{epoch}.pth"))
        if epoch + 1 < r.epochs and stop.poll():
            log.warning("stopped after epoch %d (checkpoint %s); run the same command again to resume", epoch,
                        run.ck_file)
            return
    if v is None:  # resumed at the end: report the stored network
        v = run.validate()
    change = S.relative_change(run.net, run.reference)
    run.results.update(best_acc1=run.best, best_epoch=run.best_epoch, best_acc5=run.best_acc5, last_acc1=v["acc1"],
                       last_acc5=v["acc5"], last_val_loss=v["loss"], val_images=v["n"], backbone_rel_change=change)
    log.info("fine-tuning done: last top-1 %.2f top-5 %.2f, best top-1 %.2f (epoch %d); the backbone moved %.3g "
             "(relative L2 from the pretrained weights)", v["acc1"], v["acc5"], run.best, run.best_epoch, change)
    _write_results(run, "results.json")


def _write_results(run: Run, name: str) -> None:
    if run.info.is_main:
        with open(os.path.join(run.args.dump_path, name), "w") as f:
            json.dump(run.results, f, indent=2)
        print(json.dumps(run.results), flush=True)


@cli_main
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = sanity.parse_args(get_parser, argv)
    arch_spec(args.arch)
    check_args(args)
    os.makedirs(args.dump_path, exist_ok=True)
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
