#!/usr/bin/env python
"""Small-image benchmark: every pretraining method on CIFAR-10/100 or STL-10 with lightly's protocol
(ResNet-18 CIFAR variant, kNN k=200 t=0.1 on the backbone features after every epoch, top-1 = max over
epochs), each method as a subprocess running its own entry script with its own flags.

    # lightly's rows on a GPU (batch 512, 200 or 800 epochs)
    python scripts/benchmark_small.py --dataset cifar10 --data /data/cifar --budget gpu200 --out runs/bench_c10_200
    # a short CPU budget on the generated CIFAR-10-format textures (docs/small_images.md)
    python scripts/benchmark_small.py --make_data data/textures
    python scripts/benchmark_small.py --dataset cifar10 --data data/textures --budget cpu --out runs/bench_cpu

Per method it prints the command, writes the run under ``<out>/<method>/`` and records kNN top-1 per
epoch (the run's ``log.jsonl``), wall time and peak memory (CUDA ``max_memory_allocated`` from the
log on a GPU, else the child's peak RSS from ``wait4``). Outputs: ``<out>/results.md``,
``<out>/results.csv``, ``<out>/knn_vs_time.png`` (lightly's published points on the same axes). A
method that fails is recorded with its last log line and the others go on; a rerun skips the methods
that finished (``result.json``; ``--rerun`` redoes them, failed ones run again; an unfinished method restarts from scratch so
its time stays honest). The first row is the randomly initialised encoder (``eval_knn.py``, no
``--pretrained``) under the same kNN protocol.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from src import benchmark as B
from src.cli import HelpFormatter
from src.errors import UserError, cli_main
from src.logger import setup_logging

log = logging.getLogger("ssl")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Every method on a small dataset with lightly's kNN protocol; "
                                "results table, CSV and kNN-vs-time plot", formatter_class=HelpFormatter)
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "stl10"], default="cifar10")
    p.add_argument("--data", default=None, help="folder holding cifar-10-batches-py/, cifar-100-python/ or stl10_binary/")
    p.add_argument("--out", default="runs/benchmark_small", help="results and one run folder per method")
    p.add_argument("--budget", choices=sorted(B.BUDGETS), default="gpu200",
                   help="gpu200 / gpu800: batch 512, 200 / 800 epochs (lightly); cpu: 2 x 25 steps of batch 32 at 16 px")
    p.add_argument("--methods", nargs="+", default=list(B.METHODS), choices=B.METHODS,
                   help="methods to run (disco only with --teacher)")
    p.add_argument("--teacher", default=None, help="DisCo: the frozen teacher checkpoint (DisCo is skipped without it)")
    p.add_argument("--teacher_arch", default="resnet50", help="DisCo: the teacher's arch")
    g = p.add_argument_group("budget overrides (None: the budget's value)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch", type=int, default=None, help="batch per step (one process)")
    g.add_argument("--max_iters", type=int, default=None, help="iterations per epoch cap")
    g.add_argument("--workers", type=int, default=None, help="data loading workers")
    g.add_argument("--image_size", type=int, default=None, help="crop size (None: the images' side)")
    g.add_argument("--queue", type=int, default=None, help="MoCo-family queue / CaCo memory (multiple of the batch)")
    p.add_argument("--extra", default="", help="extra flags appended to every method's command (quoted)")
    p.add_argument("--timeout_min", type=float, default=None, help="a method running longer is killed and recorded as failed")
    p.add_argument("--rerun", action="store_true", help="run again the methods that already have a result.json")
    p.add_argument("--plot", default=None, help="the figure (default <out>/knn_vs_time.png)")
    p.add_argument("--make_data", metavar="DIR", default=None,
                   help="only write the generated textures dataset in CIFAR-10 format into DIR (src/data/procedural.py)")
    p.add_argument("--train_per_class", type=int, default=200, help="--make_data: training images per class")
    p.add_argument("--test_per_class", type=int, default=50, help="--make_data: test images per class")
    p.add_argument("--seed", type=int, default=0, help="--make_data: generator seed")
    return p


def budget_of(args: argparse.Namespace) -> B.Budget:
    b = B.BUDGETS[args.budget]
    over = {k: getattr(args, k) for k in ("epochs", "batch", "max_iters", "workers", "image_size", "queue")
            if getattr(args, k) is not None}
    if args.batch is not None and args.queue is None:
        over["queue"] = max(b.queue // b.batch, 1) * args.batch
    return dataclasses.replace(b, **over) if over else b


def hardware() -> str:
    import torch
    if torch.cuda.is_available():
        return f"1 x {torch.cuda.get_device_name(0)}"
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"CPU, {len(os.sched_getaffinity(0))} cores" + (f" ({model})" if model else "")


def last_line(path: str) -> str:
    """The last non-empty line of a child's output (the last segment of a tqdm-rewritten line)."""
    try:
        with open(path, errors="replace") as f:
            lines = [seg.strip() for ln in f for seg in ln.split("\r") if seg.strip()]
    except OSError:
        return "no output"
    return lines[-1][:300] if lines else "no output"


def run_child(cmd: list[str], log_path: str, timeout_s: float | None) -> tuple[int, float, float, bool]:
    """Run ``cmd`` (output to ``log_path``); returns (exit code, wall s, the child's peak RSS in MB, timed out)."""
    t0 = time.time()
    with open(log_path, "w") as out:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            p.kill()
        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)   # the rusage of this child (and the workers it waited for)
        finally:
            if timer:
                timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.time() - t0, usage.ru_maxrss / 1024, killed.is_set()


def run_method(method: str, args: argparse.Namespace, b: B.Budget, hw: str) -> B.Result:
    run_dir = os.path.join(args.out, method)
    done = os.path.join(run_dir, "result.json")
    if os.path.isfile(done) and not args.rerun:
        res = B.load_result(done)
        if res.status == "ok":
            log.info("%s: result exists (%s), skipped (--rerun to redo)", method, done)
            return res
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    if method == "random":
        script = "eval_knn.py"
        argv = ["-a", "resnet18", "--cifar_stem", "--dataset", args.dataset, "--knn_protocol", "lightly",
                "-j", str(b.workers), "--dump_path", run_dir, *(["--image_size", str(b.image_size)] if b.image_size else []),
                args.data]
    else:
        script = B.SCRIPTS[method]
        argv = B.method_argv(method, b, args.data, args.dataset, run_dir, args.teacher, args.teacher_arch)
    argv += shlex.split(args.extra) if method != "random" else []
    shown = f"python {script} {shlex.join(argv)}"
    print(f"[{method}] {shown}", flush=True)
    start = time.time()
    timeout = args.timeout_min * 60 if args.timeout_min else None
    rc, wall, rss_mb, timed_out = run_child([sys.executable, os.path.join(REPO, script), *argv],
                                            os.path.join(run_dir, "stdout.log"), timeout)
    res = B.Result(method, "ok", shown, b.name, b.batch, 0 if method == "random" else b.epochs, hw, wall_s=wall)
    if method == "random":
        knn = B.read_json(os.path.join(run_dir, "knn_results.json"))
        res.knn = [knn["knn"]["200"]["top1"]] if knn else []
        res.knn_time_s = [wall] if knn else []
    else:
        res.knn, res.knn_time_s, cuda_mb = B.knn_curve(B.read_log(os.path.join(run_dir, "log.jsonl")), start)
        if cuda_mb is not None:
            res.memory_mb, res.memory_kind = cuda_mb, "CUDA max_memory_allocated"
    if res.memory_mb is None:
        res.memory_mb, res.memory_kind = rss_mb, "peak RSS"
    if rc != 0 or not res.knn:
        res.status = "failed"
        why = f"timed out after {args.timeout_min} min; " if timed_out else f"exit {rc}; " if rc else "no kNN result; "
        res.note = why + last_line(os.path.join(run_dir, "stdout.log"))
    B.save_result(res, done)
    top = f"kNN top-1 max {res.knn_max:.2f}" if res.knn else "no kNN"
    log.info("%s: %s, %s, %.1f min, %s %.0f MB", method, res.status, top, wall / 60, res.memory_kind, res.memory_mb)
    return res


@cli_main
def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    setup_logging(None)
    if args.make_data:
        from src.data.procedural import write_procedural_cifar10
        write_procedural_cifar10(args.make_data, args.train_per_class, args.test_per_class, seed=args.seed)
        print(f"wrote the generated textures dataset (CIFAR-10 format) to {args.make_data}/cifar-10-batches-py")
        return
    if not args.data:
        raise UserError("give --data (the folder holding the dataset files) or --make_data DIR")
    from src.data.small import check_files
    check_files(args.dataset, args.data)
    if args.teacher and not os.path.isfile(args.teacher):
        raise UserError(f"--teacher {args.teacher}: no such file")
    b = budget_of(args)
    os.makedirs(args.out, exist_ok=True)
    hw = hardware()
    results = [run_method("random", args, b, hw)]
    for method in args.methods:
        if method == "disco" and not args.teacher:
            print("[disco] skipped: DisCo distils a frozen teacher; give --teacher CKPT (and --teacher_arch)", flush=True)
            continue
        results.append(run_method(method, args, b, hw))
    label = {"cpu": "CPU short budget"}.get(b.name, f"{b.epochs} epochs")
    title = f"{args.dataset} ({args.data}), {label}: batch {b.batch}, {b.epochs} epochs" + \
        (f" x {b.max_iters} iterations" if b.max_iters else "") + (f", {b.image_size} px crops" if b.image_size else "")
    notes = [(f"Hardware: {hw}. kNN: k=200, t=0.1, backbone features, after every epoch; top-1 = max over epochs "
              "(lightly's protocol). The first row is the randomly initialised encoder under the same kNN.")]
    B.write_markdown(results, os.path.join(args.out, "results.md"), f"Small-image benchmark: {title}", notes)
    B.write_csv(results, os.path.join(args.out, "results.csv"))
    figure = B.plot(results, args.plot or os.path.join(args.out, "knn_vs_time.png"), title)
    failed = [r.method for r in results if r.status != "ok"]
    print(f"wrote {args.out}/results.md, results.csv and {figure}" + (f"; failed: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
