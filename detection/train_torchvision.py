#!/usr/bin/env python
"""Detection transfer without Detectron2: the MoCo R-C4 Faster R-CNN protocol with torchvision's
detection package (disco_pcl_evals.md C5). The command line is ``train_net.py``'s:

    export DETECTRON2_DATASETS=/dev/shm          # holds VOC2007/, VOC2012/ (and coco/)
    cd detection
    python train_torchvision.py --config-file configs/pascal_voc_R_50_C4_24k_moco.yaml --num-gpus 8 \
        --pretrained /path/ckpt/checkpoint_0199.pth.tar MODEL.RESNETS.DEPTH 34 MODEL.RESNETS.RES2_OUT_CHANNELS 64
    torchrun --nproc_per_node 8 train_torchvision.py --config-file configs/moco/pascal_voc_R_50_C4_24k_moco.yaml \
        MODEL.WEIGHTS ./output.pkl

Weights: ``--pretrained`` (any checkpoint layout ``load_backbone`` knows) or ``MODEL.WEIGHTS`` (the same, or
the ``.pkl`` of ``convert_to_detectron2.py``). Config keys: ``src/detection/config.py`` (Detectron2's
names and defaults; unsupported keys are refused). Outputs in ``OUTPUT_DIR``: ``model_*.pth``,
``last_checkpoint``, ``log.jsonl``, TensorBoard, ``results.json`` (AP, AP50, AP75 per test set).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from src import distributed as D
from src import sanity, zoo
from src.cli import HelpFormatter, positive_int
from src.detection import config as C
from src.detection.data import DetectionDataset, load_dataset, training_records
from src.detection.model import arch_of, build_detector, pretrained_resnet
from src.detection.train import Run, build_optimizer, evaluate, last_checkpoint, load_detector_checkpoint, train
from src.engine import StopSignal, TrainStep, seed_everything
from src.errors import UserError, cli_main
from src.logger import RunLogger, save_args, setup_logging
from src.models.backbones import build_backbone, convert_sync_batchnorm

log = logging.getLogger("ssl")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = "configs/moco/pascal_voc_R_50_C4_24k_moco.yaml"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="R-C4 Faster R-CNN transfer (MoCo protocol) with torchvision; "
                                "train_net.py's command line", formatter_class=HelpFormatter)
    p.add_argument("--config-file", "--config_file", dest="config_file", default=DEFAULT_CONFIG, metavar="FILE",
                   help="Detectron2-style YAML (looked up in the current directory, then next to this script)")
    p.add_argument("--resume", action="store_true",
                   help="resume from OUTPUT_DIR/last_checkpoint (Detectron2's flag; --auto_resume does it by default)")
    p.add_argument("--resume-from", "--resume_from", dest="resume_from", default="",
                   help="resume from this checkpoint file (empty: OUTPUT_DIR/last_checkpoint when resuming)")
    p.add_argument("--auto_resume", type=D.str2bool, default=True,
                   help="resume from OUTPUT_DIR/last_checkpoint when it exists (true/false)")
    p.add_argument("--eval-only", "--eval_only", dest="eval_only", action="store_true",
                   help="evaluate the newest checkpoint of OUTPUT_DIR (or --resume-from / MODEL.WEIGHTS) and stop")
    p.add_argument("--num-gpus", "--num_gpus", dest="num_gpus", type=int, default=1,
                   help="processes per machine (one per GPU; CPU processes with gloo on a machine without GPU)")
    p.add_argument("--num-machines", "--num_machines", dest="num_machines", type=int, default=1, help="machines")
    p.add_argument("--machine-rank", "--machine_rank", dest="machine_rank", type=int, default=0,
                   help="rank of this machine")
    p.add_argument("--pretrained", default="", help="pretraining checkpoint, any layout (empty: MODEL.WEIGHTS)")
    p.add_argument("--data_root", default=os.environ.get("DETECTRON2_DATASETS", "datasets"),
                   help="holds VOC2007/, VOC2012/, coco/ (default: $DETECTRON2_DATASETS or ./datasets)")
    p.add_argument("--test_batch_size", type=int, default=1, help="test images per process and forward")
    p.add_argument("-p", "--print-freq", "--print_freq", dest="print_freq", type=int, default=20,
                   help="log every N iterations")
    p.add_argument("--use_fp16", "--use-fp16", dest="use_fp16", type=D.str2bool, nargs="?", const=True, default=False,
                   help="fp16 autocast + GradScaler on CUDA (same as SOLVER.AMP.ENABLED True; true/false)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--stop_check_every", type=positive_int, default=10,
                   help="iterations between two polls for a stop signal (SIGTERM/SIGUSR1): the run then writes "
                        "model_interrupted.pth and the same command resumes it")
    D.add_dist_args(p, dist_url_default="env://")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help="config overrides at the end of the command, e.g. SOLVER.MAX_ITER 1000 MODEL.RESNETS.DEPTH 18")
    return p


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    cfg, out = args.cfg, args.cfg["OUTPUT_DIR"]
    setup_logging(out, info.rank, name="train_torchvision.log")
    sanity.report(info, *args.warnings, sanity.amp_notice(args, info.device))
    seed = C.get(cfg, "SEED")
    seed = D.broadcast_object(seed if seed >= 0 else int.from_bytes(os.urandom(4), "little") % 2 ** 31)
    seed_everything(seed)
    arch = arch_of(cfg)
    global_batch = C.get(cfg, "SOLVER.IMS_PER_BATCH")
    if global_batch % info.world_size:
        raise UserError(f"SOLVER.IMS_PER_BATCH {global_batch} is not divisible by the {info.world_size} processes")
    # --eval-only: the weights come from the detector checkpoint below
    resnet = build_backbone(arch) if args.eval_only else pretrained_resnet(args.pretrained or C.get(cfg, "MODEL.WEIGHTS"), arch)
    net = build_detector(cfg, resnet, arch)
    if info.distributed and info.device.type == "cuda" and C.get(cfg, "MODEL.RESNETS.NORM") in ("SyncBN", "naiveSyncBN"):
        net = convert_sync_batchnorm(net)  # on CPU (gloo) BN stays per process; PreciseBN averages it
    net.to(info.device)
    amp = "bf16" if args.bf16 else ("fp16" if args.use_fp16 or C.get(cfg, "SOLVER.AMP.ENABLED") else None)
    step = TrainStep(build_optimizer(net, cfg), info.device, amp)
    tests = [load_dataset(n, args.data_root) for n in C.get(cfg, "DATASETS.TEST")]
    resume = D.broadcast_object(resume_path(args, cfg) if info.is_main else None)  # rank 0 decides
    start = 0
    if resume:
        ck = load_detector_checkpoint(resume, net, arch, None if args.eval_only else step.optimizer,
                                      None if args.eval_only else step.scaler)
        start, seed = int(ck["iteration"]), int(ck.get("seed", seed))
        log.info("resumed from %s at iteration %d", resume, start)
    if args.eval_only:
        args.result = evaluate(net, tests, info.device, args.test_batch_size, C.get(cfg, "DATALOADER.NUM_WORKERS"),
                               step.autocast)
        if info.is_main:
            print(json.dumps(args.result), flush=True)
        return
    model = net
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[info.device] if info.device.type == "cuda" else None, forward_sync_buffers=False)
    train_recs = training_records([load_dataset(n, args.data_root) for n in C.get(cfg, "DATASETS.TRAIN")])
    per_process = global_batch // info.world_size
    log.info("%s C4 Faster R-CNN | %d processes (device %s) | %d images per step (%d per process) | lr %g, x%g at %s, "
             "warm-up %d | %d iterations from %d | train %d images of %s | test %s | seed %d", arch, info.world_size,
             info.device, global_batch, per_process, C.get(cfg, "SOLVER.BASE_LR"), C.get(cfg, "SOLVER.GAMMA"),
             list(C.get(cfg, "SOLVER.STEPS")), C.get(cfg, "SOLVER.WARMUP_ITERS"), C.get(cfg, "SOLVER.MAX_ITER"), start,
             len(train_recs), "+".join(C.get(cfg, "DATASETS.TRAIN")), "+".join(t.name for t in tests), seed)
    flip = C.get(cfg, "INPUT.RANDOM_FLIP") == "horizontal"
    logger = RunLogger(out, active=info.is_main)
    if info.is_main:
        save_args({**vars(args), "cfg": cfg}, out, "config.json")
    run = Run(cfg, info, model, net, step.optimizer, step, DetectionDataset(train_recs, True, seed, flip), tests, logger,
              out, {"arch": arch, "seed": seed, "cfg": cfg}, start, per_process,
              C.get(cfg, "DATALOADER.NUM_WORKERS"), args.test_batch_size, args.print_freq)
    with StopSignal(args.stop_check_every) as stop:
        try:
            args.result = train(run, stop)
        finally:
            logger.close()


def resume_path(args: argparse.Namespace, cfg: dict) -> str | None:
    """``--resume-from``, else OUTPUT_DIR's ``last_checkpoint`` (with ``--resume``, ``--auto_resume`` or
    ``--eval-only``), else for ``--eval-only`` a detector checkpoint given as ``MODEL.WEIGHTS``."""
    out = cfg["OUTPUT_DIR"]
    path = args.resume_from or ((args.resume or args.auto_resume or args.eval_only) and last_checkpoint(out)) or None
    if args.eval_only and not path:
        path = C.get(cfg, "MODEL.WEIGHTS") if C.get(cfg, "MODEL.WEIGHTS").endswith(".pth") else None
        if not path:
            raise UserError(f"--eval-only: no checkpoint in {out} (give --resume-from or MODEL.WEIGHTS model_final.pth)")
    return path


def launch_args(args: argparse.Namespace) -> None:
    """Detectron2's ``--num-gpus N --num-machines M --machine-rank R`` as this repository's launch
    flags (torchrun's environment, when present, wins)."""
    if args.num_gpus < 1 or args.num_machines < 1:
        raise UserError("--num-gpus and --num-machines must be at least 1")
    if torch.cuda.is_available() and args.num_gpus > torch.cuda.device_count():
        raise UserError(f"--num-gpus {args.num_gpus} but {torch.cuda.device_count()} GPUs are visible")
    if args.num_gpus * args.num_machines > 1 and "RANK" not in os.environ:
        args.multiprocessing_distributed, args.nproc = True, args.num_gpus
        args.world_size, args.rank = args.num_machines, args.machine_rank
        if args.num_machines > 1 and args.dist_url == "env://":
            raise UserError("--num-machines > 1 needs --dist-url tcp://<machine 0>:<port>")


@cli_main
def main(argv=None) -> dict | None:
    args = sanity.parse_args(get_parser, argv)
    cfg_file = C.find_config(args.config_file, HERE) if args.config_file else None
    args.cfg = C.build_config(cfg_file, args.opts)
    args.warnings = C.check_config(args.cfg, args.eval_only)
    arch_of(args.cfg)
    args.pretrained = zoo.resolve_arg(args.pretrained, "--pretrained")   # a path, URL or zoo name (src/zoo.py)
    if args.resume_from and not os.path.isfile(args.resume_from):
        raise UserError(f"--resume-from checkpoint not found: {args.resume_from}")
    launch_args(args)
    os.makedirs(args.cfg["OUTPUT_DIR"], exist_ok=True)
    D.launch(main_worker, args)
    return getattr(args, "result", None)  # the results of a single-process run (tests)


if __name__ == "__main__":
    main()
