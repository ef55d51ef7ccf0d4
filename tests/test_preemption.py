"""Preemption at the points issue 14 names, each through the real entry script (one process, CPU, the
tiny folder, a few iterations): a real SIGUSR1 / SIGTERM is sent to the process at a precise call
(``firing``), the run checkpoints within seconds and returns cleanly, and re-running the same command
ends bit-identical to an uninterrupted run, method state included.

- CaCo inside the ``--ad_init`` warm-up (resumed at the next unseen warm-up batch);
- SogCLR and DisCo in the middle of an epoch (u; student, teacher, queue);
- MoCo inside the kNN monitor pass, PCL inside its E-step's feature pass.
"""
from __future__ import annotations

import json
import os
import signal
import time

import torch

from src.checkpoint import load_checkpoint

# signal → return: a stop at the next poll plus one checkpoint write of a resnet18 run
WITHIN_S = 10.0


def firing(cls, attr: str, at: int, sig: int = signal.SIGUSR1):
    """A subclass of ``cls`` whose method ``attr`` sends ``sig`` to this process on its ``at``-th call
    (1-based), before running; ``sub.fired`` holds the time it did."""
    def wrapped(self, *a, **kw):
        sub.calls += 1
        if sub.calls == at:
            sub.fired = time.time()
            os.kill(os.getpid(), sig)
        return getattr(super(sub, self), attr)(*a, **kw)
    sub = type(cls.__name__, (cls,), {attr: wrapped, "calls": 0, "fired": None})
    return sub


def assert_same(a, b, where: str = "") -> None:
    """Recursive bit-equality of checkpoint contents (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def same_final(ref: str, run: str, name: str, keys: tuple[str, ...] = ()) -> dict:
    a, b = load_checkpoint(os.path.join(ref, name)), load_checkpoint(os.path.join(run, name))
    for k in ("epoch", "state_dict", "optimizer", "scaler", *keys):
        assert_same(a[k], b[k], k)
    return a


def interrupted(run: str) -> dict:
    return load_checkpoint(os.path.join(run, "checkpoint_interrupted.pth.tar"))


def rows(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(x) for x in f]


def stopped_quickly(cls) -> None:
    assert cls.fired is not None, "the signal was never sent"
    assert time.time() - cls.fired < WITHIN_S


# ----------------------------------------------------------------------------- CaCo --ad_init
def test_caco_stop_inside_ad_init_continues_it_on_resume(tmp_path, tiny_folder, monkeypatch):
    """32 images at batch 4, K = 16: 4 warm-up iterations before epoch 0. SIGTERM in the 2nd one: the stop
    point after its keys are written checkpoints (warm-up iteration 2, 8 columns filled); the rerun
    runs warm-up iterations 2-3 only, then trains, and ends with the weights, W, v and optimiser of an
    uninterrupted run."""
    import main_caco
    from src.methods.caco import CaCo
    argv = ["--data", tiny_folder, "-a", "resnet18", "--image_size", "32", "--workers", "0", "--batch_size", "4",
            "--cluster", "16", "--moco_dim", "8", "--mlp_dim", "16", "--epochs", "1", "--max_iters", "1",
            "--knn_freq", "0", "--ad_init", "1", "--lr", "0.3", "--memory_lr", "3.0", "--stop_check_every", "1"]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    main_caco.main(argv + ["--output_dir", ref])
    Firing = firing(CaCo, "_forward_ad_init", 2, signal.SIGTERM)
    monkeypatch.setattr(main_caco, "CaCo", Firing)
    main_caco.main(argv + ["--output_dir", run])
    stopped_quickly(Firing)
    assert Firing.calls == 2 and not os.path.exists(os.path.join(run, main_caco.BEST))
    ck = interrupted(run)
    assert ck["warmup"] == {"iter": 2, "filled": 8} and (ck["epoch"], ck["iter"]) == (0, 0)
    monkeypatch.setattr(main_caco, "CaCo", CaCo)
    main_caco.main(argv + ["--output_dir", run])
    warm = [(r["iter"], r["ad_init_filled"]) for r in rows(run) if "ad_init_filled" in r]
    assert warm == [(i, 4 * (i + 1)) for i in range(4)]   # 0-1 before the stop, 2-3 after: none twice
    same_final(ref, run, main_caco.BEST, keys=("Memory_Bank",))
    assert not os.path.exists(os.path.join(run, "checkpoint_interrupted.pth.tar"))


def test_warmup_stop_requeues_and_resumes_with_another_batch_on_the_unseen_images(tmp_path, monkeypatch):
    """The engine side of a resumable warm-up: a stop at a stop point writes the warm-up state, requeues
    under SLURM (--requeue), and a rerun with batch 6 instead of 8 continues with exactly the 24 images of
    the warm-up's epoch the stopped run had not seen (none twice, none skipped)."""
    import stat

    from tests.test_engine import Tiny, _trainer

    class Warm(Tiny):
        def __init__(self):
            super().__init__()
            self.seen: list[int] = []

        def on_fresh_start(self, ctx):
            done = ctx.warmup_state or {}
            start = self.start = done.get("iter", 0)
            for i, (crops, _, index) in enumerate(ctx.batches(0, start=start), start=start):
                ctx.step(lambda c=crops, ix=index: ctx.forward(c, ix), lr=0.05, iteration=i)
                self.seen += index.tolist()
                ctx.stop_point(i + 1, {"seen": done.get("seen", 0) + len(self.seen)})
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
    (bindir / "scontrol").chmod(0o755 | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    first = Warm()
    res = _trainer(tmp_path / "run", method=first, epochs=1, fire_at=1, stop_check_every=1, requeue=True).fit()
    assert res == {"interrupted": 1.0, "warmup_iter": 1.0}
    assert (tmp_path / "calls").read_text().split() == ["requeue", "77"]
    assert interrupted(str(tmp_path / "run"))["warmup"] == {"iter": 1, "seen": 8}
    second = Warm()
    t = _trainer(tmp_path / "run", method=second, epochs=1, batch=6)
    t.fit()
    assert second.start == 8 // 6 and len(second.seen) == 24 and sorted(first.seen + second.seen) == list(range(32))
    assert t.resumed_from.endswith("checkpoint_interrupted.pth.tar") and t.warmup_state is None


# ----------------------------------------------------------------------------- SogCLR / DisCo mid-epoch
def test_sogclr_stop_mid_epoch_resumes_u_and_weights_exactly(tmp_path, tiny_folder, monkeypatch):
    """An epoch of 2 iterations at global batch 8; SIGUSR1 in the first forward → checkpoint at
    (epoch 0, iteration 1); the rerun ends with the u, weights, LARS state and scaler of an
    uninterrupted run."""
    import main_sogclr
    from src.methods.sogclr import SogCLR
    argv = ["--data", tiny_folder, "-a", "resnet18", "--image_size", "32", "--workers", "0", "--batch-size", "8",
            "--dim", "16", "--mlp-dim", "32", "--epochs", "1", "--warmup-epochs", "1", "--max_iters", "2",
            "--print-freq", "1000", "--stop_check_every", "1"]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    main_sogclr.main(argv + ["--output_dir", ref])
    Firing = firing(SogCLR, "forward", 1)
    monkeypatch.setattr(main_sogclr, "SogCLR", Firing)
    main_sogclr.main(argv + ["--output_dir", run])
    stopped_quickly(Firing)
    ck = interrupted(run)
    assert (ck["epoch"], ck["iter"]) == (0, 1) and not os.path.exists(os.path.join(run, "checkpoint_0000.pth.tar"))
    monkeypatch.setattr(main_sogclr, "SogCLR", SogCLR)
    main_sogclr.main(argv + ["--output_dir", run])
    a = same_final(ref, run, "checkpoint_0000.pth.tar", keys=("u",))
    assert not torch.equal(ck["u"], a["u"]) and (ck["u"] > 0).sum() == 8   # u moved after the resume


def _moco_teacher(path: str, dim: int) -> str:
    """A MoCo v2 ResNet-18 checkpoint (random weights) for DisCo's teacher."""
    from src.methods.moco import MoCo
    torch.manual_seed(1)
    m = MoCo("resnet18", dim, 16, mlp=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}, "arch": "resnet18"}, path)
    return path


def test_disco_stop_mid_epoch_resumes_student_teacher_and_queue_exactly(tmp_path, tiny_folder, monkeypatch):
    """DisCo with the teacher's BN in train mode (its running statistics move) and --save_teacher:
    SIGUSR1 in the first of 2 iterations → checkpoint at (0, 1); the rerun ends with the student, key encoder, queue,
    pointer and teacher (BN statistics included) of an uninterrupted run."""
    import main_disco
    from src.methods.disco import DisCo
    teacher = _moco_teacher(str(tmp_path / "teacher.pth.tar"), 16)
    argv = ["-a", "resnet18", "--lr", "0.03", "--batch-size", "8", "--moco-k", "16", "--moco-t", "0.2", "--mlp",
            "--aug-plus", "--cos", "--teacher_arch", "resnet18", "--teacher", teacher, "--moco-dim", "16",
            "--hidden", "32", "--image_size", "32", "-j", "0", "--epochs", "1", "--max_iters", "2",
            "--stop_check_every", "1", "--save_teacher", tiny_folder]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    main_disco.main(argv + ["--output_dir", ref])
    Firing = firing(DisCo, "forward", 1)
    monkeypatch.setattr(main_disco, "DisCo", Firing)
    main_disco.main(argv + ["--output_dir", run])
    stopped_quickly(Firing)
    assert (interrupted(run)["epoch"], interrupted(run)["iter"]) == (0, 1)
    monkeypatch.setattr(main_disco, "DisCo", DisCo)
    main_disco.main(argv + ["--output_dir", run])
    a = same_final(ref, run, "checkpoint_0000.pth.tar", keys=("teacher_info",))
    sd = a["state_dict"]
    assert int(sd["module.queue_ptr"]) == 0 and "module.queue" in sd   # 2 steps x 8 keys: the queue wrapped
    bn = [k for k in sd if k.startswith("module.teacher_encoder_q.") and k.endswith("running_mean")]
    t0 = load_checkpoint(teacher)["state_dict"]
    assert bn and not torch.equal(sd[bn[0]], t0[bn[0].replace("teacher_", "")])   # the teacher's BN moved


# ----------------------------------------------------------------------------- kNN monitor / PCL E-step
def test_stop_inside_the_knn_monitor_resumes_exactly(tmp_path, tiny_folder, monkeypatch):
    """main_moco with the monitor after every epoch (bank: 32 images, batch 3). SIGTERM as the monitor of
    epoch 0 starts: the pass is dropped at its first poll (batch 10), checkpoint_0000 is written and
    the run stops; the rerun trains epoch 1 and ends identical to an uninterrupted run (shuffle-BN draws
    from the global RNG, so the monitor must leave it untouched)."""
    import main_moco
    from src.engine import monitor
    argv = ["-a", "resnet18", "--batch-size", "8", "--moco-k", "32", "--mlp", "--image_size", "32", "-j", "0",
            "--epochs", "2", "--max_iters", "1", "--knn_freq", "1", "--knn_batch_size", "3", "--shuffle_bn_groups", "2",
            tiny_folder]
    real, seen = monitor.extract_features, {"fire": False, "fired": None, "batches": 0}

    class Counted(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            seen["batches"] += 1
            return self.net(x)

    def extract(net, dataset, batch_size, workers, *a, **kw):   # the monitor's 4 loader workers: none here
        if seen["fire"] and seen["fired"] is None:
            seen["fired"] = time.time()
            os.kill(os.getpid(), signal.SIGTERM)
        return real(Counted(net), dataset, batch_size, 0, *a, **kw)
    monkeypatch.setattr(monitor, "extract_features", extract)
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    main_moco.main(argv + ["--output_dir", ref])
    seen.update(fire=True, batches=0)
    main_moco.main(argv + ["--output_dir", run])
    assert seen["batches"] == 9 and time.time() - seen["fired"] < WITHIN_S   # dropped at the poll of batch 10
    assert os.path.exists(os.path.join(run, "checkpoint_0000.pth.tar"))
    assert not os.path.exists(os.path.join(run, "checkpoint_0001.pth.tar"))
    assert not any("knn_top1" in r for r in rows(run))
    seen["fire"] = False
    main_moco.main(argv + ["--output_dir", run])
    same_final(ref, run, "checkpoint_0001.pth.tar")
    knn = [(r["epoch"], r["knn_top1"]) for r in rows(run) if "knn_top1" in r]
    assert knn == [(e, r["knn_top1"]) for r in rows(ref) if "knn_top1" in r for e in [r["epoch"]] if e == 1]


PCL_ARGV = ["-a", "resnet18", "--lr", "0.03", "--batch-size", "4", "--temperature", "0.2", "--mlp", "--aug-plus",
            "--cos", "--epochs", "2", "--warmup-epoch", "1", "--num-cluster", "12,16", "--pcl-r", "4",
            "--image_size", "32", "-j", "0", "--max_iters", "2", "--low-dim", "16"]


def test_stop_inside_the_pcl_estep_reruns_it_and_resumes_exactly(tmp_path, tiny_folder, monkeypatch):
    """main_pcl, warm-up epoch 0, E-step before epoch 1. SIGUSR1 as the E-step's feature pass starts
    (polled every batch here): checkpoint (epoch 1, iteration 0) without a clustering; the rerun does
    the E-step, trains epoch 1 and ends identical (clustering buffers included) to an uninterrupted run."""
    import main_pcl
    from src.eval import features
    from src.methods.pcl import PCL
    monkeypatch.setattr(features, "STOP_POLL_EVERY", 1)
    argv = [*PCL_ARGV, tiny_folder]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    main_pcl.main(argv + ["--exp-dir", ref])
    Firing = firing(PCL, "compute_features", 1)
    monkeypatch.setattr(main_pcl, "PCL", Firing)
    main_pcl.main(argv + ["--exp-dir", run])
    stopped_quickly(Firing)
    ck = interrupted(run)
    assert (ck["epoch"], ck["iter"]) == (1, 0) and int(ck["state_dict"]["module.cluster_epoch"]) != 1
    monkeypatch.setattr(main_pcl, "PCL", PCL)
    main_pcl.main(argv + ["--exp-dir", run])
    a = same_final(ref, run, "checkpoint_0001.pth.tar")
    assert int(a["state_dict"]["module.cluster_epoch"]) == 1


def test_stop_inside_pcl_kmeans_is_taken_within_seconds(tmp_path, tiny_folder, monkeypatch):
    """PCL's k-means (rank 0, minutes at ImageNet scale) stands in as a clustering that would take 120 s:
    SIGUSR1 as it starts is taken within seconds (rank 0 polls the signal while faiss runs in a helper
    thread), the clustering is abandoned, the epoch's start checkpointed; the rerun clusters again and
    ends identical to an uninterrupted run."""
    import threading

    import main_pcl
    from src.methods import pcl_cluster
    argv = [*PCL_ARGV, tiny_folder]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    main_pcl.main(argv + ["--exp-dir", ref])
    real, release, fired = pcl_cluster.cluster_all, threading.Event(), {}

    def slow_cluster(*a, **kw):
        fired["t"] = time.time()
        os.kill(os.getpid(), signal.SIGUSR1)
        release.wait(120)
        raise RuntimeError("the abandoned k-means was waited for")
    monkeypatch.setattr(pcl_cluster, "cluster_all", slow_cluster)
    try:
        main_pcl.main(argv + ["--exp-dir", run])
    finally:
        release.set()
    assert "t" in fired and time.time() - fired["t"] < WITHIN_S
    ck = interrupted(run)
    assert (ck["epoch"], ck["iter"]) == (1, 0) and int(ck["state_dict"]["module.cluster_epoch"]) != 1
    monkeypatch.setattr(pcl_cluster, "cluster_all", real)
    main_pcl.main(argv + ["--exp-dir", run])
    a = same_final(ref, run, "checkpoint_0001.pth.tar")
    assert int(a["state_dict"]["module.cluster_epoch"]) == 1
