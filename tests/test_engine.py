"""The engine's stop/resume guarantees and hooks (issue 7), each provoked for real: signals sent to
the process, checkpoints written by one configuration and resumed by another, skipped fp16 steps."""
from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from src.checkpoint import load_checkpoint
from src.distributed import DistInfo
from src.engine import CheckpointPolicy, EngineConfig, KnnMonitor, Trainer, TrainStep, seed_everything
from src.errors import UserError
from src.methods.base import ContrastiveMethod
from tests.dist_utils import run_distributed


class Blobs(Dataset):
    """32 tiny 3×8×8 images in 4 classes, two noisy views each (seeded per (epoch, index) like the
    real datasets, so resume is exact), item = (crops, target, index)."""

    def __init__(self, n: int = 32, views: int = 2):
        self.views = views
        g = torch.Generator().manual_seed(0)
        self.base = torch.randn(4, 3, 8, 8, generator=g)
        self.targets = [i % 4 for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        g = torch.Generator().manual_seed(1000 * int(epoch) + int(index))
        x = self.base[self.targets[index]]
        views = [x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(self.views)]
        return (views if self.views > 1 else views[0]), self.targets[index], int(index)


class Tiny(ContrastiveMethod):
    """A small contrastive method with a BN layer, a non-BN buffer and optional frozen teacher."""

    def __init__(self, teacher: bool = False):
        super().__init__()
        self.arch = "resnet18"
        self.encoder_q = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8))
        self.register_buffer("memory", torch.zeros(4, 8))
        if teacher:
            self.teacher = nn.Linear(8, 8)
        self.steps_seen: list = []
        self.epochs_started: list = []

    def forward(self, crops, index=None, **kw):
        a, b = (F.normalize(self.encoder_q(c), dim=1) for c in crops[:2])
        if hasattr(self, "teacher"):
            b = b + 0 * self.teacher(b)
        logits = a @ b.T / 0.2
        loss = F.cross_entropy(logits, torch.arange(a.shape[0]))
        with torch.no_grad():
            self.memory.mul_(0.9).add_(0.1 * a[:4].float())
        return {"loss": loss}

    def backbone(self):
        return self.encoder_q[:5]

    def frozen_modules(self):
        return ["teacher"] if hasattr(self, "teacher") else []

    def after_step(self, step):
        self.steps_seen.append((step.epoch, step.iteration, step.applied))

    def on_epoch_start(self, epoch, ctx=None):
        self.epochs_started.append((epoch, ctx.resumed_mid_epoch if ctx else None))


def _trainer(out, *, epochs=3, batch=8, fire_at=None, teacher=False, method=None, info=None, **cfg_kw) -> Trainer:
    seed_everything(0)
    m = method or Tiny(teacher)
    if fire_at is not None:
        orig, calls = m.forward, [0]

        def forward(crops, index=None, **kw):
            calls[0] += 1
            if calls[0] == fire_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            return orig(crops, index, **kw)
        m.forward = forward
    pol = cfg_kw.pop("policy", None) or CheckpointPolicy(str(out))
    cfg = EngineConfig(epochs=epochs, batch_size=batch, output_dir=str(out), checkpoint=pol, method_name="tiny",
                       arch=cfg_kw.pop("arch", "resnet18"), workers=0, **cfg_kw)
    opt = torch.optim.SGD(m.trainable_parameters(), 0.1, momentum=0.9)
    return Trainer(m, opt, lambda e, i, n: 0.1 * (1 - (e * n + i) / (3 * n)), Blobs(), cfg, info or DistInfo())


def _same_state(a: dict, b: dict) -> None:
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


# ----------------------------------------------------------------------------- stop signals
def test_stop_is_honoured_whatever_print_freq(tmp_path):
    """--print_freq above the iterations of an epoch (SogCLR's seed uses 1000): the stop is still
    taken within stop_check_every steps, and the resumed run ends identical to an uninterrupted one."""
    _trainer(tmp_path / "ref", print_freq=1000).fit()
    run = tmp_path / "run"
    # 4 iterations per epoch; the 5th forward is epoch 1 iteration 0, the next poll after global step 5
    res = _trainer(run, fire_at=5, print_freq=1000, stop_check_every=3).fit()
    assert res == {"interrupted": 1.0, "next_iter": 2.0}
    ck = load_checkpoint(str(run / "checkpoint_interrupted.pth.tar"))
    assert (ck["epoch"], ck["iter"]) == (1, 2)
    t = _trainer(run, print_freq=1000, stop_check_every=3)
    t.fit()
    assert t.method.epochs_started[0] == (1, True) and t.method.epochs_started[1] == (2, False)
    _same_state(load_checkpoint(str(tmp_path / "ref" / "checkpoint_0002.pth.tar")),
                load_checkpoint(str(run / "checkpoint_0002.pth.tar")))


def test_stop_on_an_epochs_last_iteration_stops_between_epochs(tmp_path):
    """A signal during an epoch's last step is taken at the epoch end. With no regular checkpoint
    for that epoch (SogCLR saves every 10), an interrupted one at (next epoch, iteration 0) is written."""
    pol = CheckpointPolicy(str(tmp_path), should_save=lambda e, n: False)
    res = _trainer(tmp_path, fire_at=4, policy=pol, stop_check_every=100).fit()
    assert res.get("interrupted") == 1.0
    ck = load_checkpoint(str(tmp_path / "checkpoint_interrupted.pth.tar"))
    assert (ck["epoch"], ck["iter"]) == (1, 0)
    t = _trainer(tmp_path, policy=CheckpointPolicy(str(tmp_path), should_save=lambda e, n: False))
    t.fit()
    assert t.method.epochs_started == [(1, False), (2, False)] and t.start_epoch == 1


class _SignalInEval(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.net(x)


def test_stop_inside_the_knn_monitor(tmp_path):
    """SIGTERM while the monitor embeds its bank: the pass is dropped, the epoch's checkpoint is
    written and the run stops (polled every 10 batches of the feature pass)."""
    m = Tiny()
    hook = _SignalInEval(m.encoder_q[:5])
    m.backbone = lambda: hook
    knn = KnnMonitor(Blobs(views=1), Blobs(views=1), 4, batch_size=1, workers=0, schedule=lambda e: True)
    t = _trainer(tmp_path, method=m)
    t.knn = knn
    res = t.fit()
    assert res.get("interrupted") == 1.0 and "knn_top1" not in res
    assert hook.calls == 9  # the poll before batch 10 of the first bank pass (of 32)
    assert (tmp_path / "checkpoint_0000.pth.tar").exists() and not (tmp_path / "checkpoint_0001.pth.tar").exists()


def test_second_signal_ends_at_once():
    import subprocess
    import sys

    from src.engine import StopSignal
    code = ("import os, signal, time, sys; sys.path.insert(0, %r)\n"
            "from src.engine import StopSignal\n"
            "with StopSignal(5):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    print('first handled', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5); print('not reached')\n") % os.path.dirname(os.path.dirname(__file__))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "first handled" in r.stdout and "not reached" not in r.stdout and r.returncode == -signal.SIGTERM
    assert StopSignal(1).poll() is False


# ----------------------------------------------------------------------------- steps and hooks
def test_skipped_fp16_step_is_reported_and_state_updates_can_skip():
    """GradScaler skips the step on non-finite gradients: StepInfo.applied is False and the
    parameters are unchanged; the next finite step is applied."""
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    step = TrainStep(opt, torch.device("cpu"), force_scaler=True)
    bad = torch.tensor([1.0, float("inf"), 1.0])
    _, info = step(lambda: {"loss": (w * bad).sum()}, 0.1, 0, 0, 0)
    assert info.applied is False and torch.equal(w.detach(), torch.ones(3))
    _, info = step(lambda: {"loss": (w * 2).sum()}, 0.1, 0, 1, 1)
    assert info.applied is True and torch.allclose(w.detach(), torch.full((3,), 0.8))


def test_before_step_hook_sees_gradients_and_can_freeze(tmp_path):
    class Freezing(Tiny):
        def before_optimizer_step(self, step):
            assert step.applied is None and self.encoder_q[5].weight.grad is not None
            if step.global_step < 2:  # SwAV-style: freeze the head for the first iterations
                self.encoder_q[5].weight.grad = None
    m = Freezing()
    w0 = m.encoder_q[5].weight.detach().clone()
    t = _trainer(tmp_path, method=m, epochs=1, max_iters=2)
    t.optimizer = torch.optim.SGD(m.trainable_parameters(), 0.1)  # no momentum: a None grad means no change
    t.step.optimizer = t.optimizer
    t.fit()
    assert torch.equal(m.encoder_q[5].weight, w0) and not torch.equal(m.encoder_q[0].weight.grad, torch.zeros(1))
    assert [s[:2] for s in m.steps_seen] == [(0, 0), (0, 1)] and all(s[2] is True for s in m.steps_seen)


def test_fresh_start_hook_runs_engine_steps_only_when_not_resumed(tmp_path):
    class Warm(Tiny):
        warm_calls = 0

        def on_fresh_start(self, ctx):
            Warm.warm_calls += 1
            assert not ctx.resumed
            for i, (crops, _, index) in enumerate(ctx.batches(0)):
                out, info = ctx.step(lambda: ctx.forward(crops, index), lr=0.05, iteration=i)
                assert info.applied and info.lr == 0.05 and torch.isfinite(out["loss"])
                if i == 1:
                    break
    m = Warm()
    w0 = m.encoder_q[0].weight.detach().clone()
    t = _trainer(tmp_path, method=m, epochs=1)
    t.fit()
    assert Warm.warm_calls == 1 and not torch.equal(w0, m.encoder_q[0].weight)
    t2 = _trainer(tmp_path, method=Warm(), epochs=2)
    t2.fit()
    assert Warm.warm_calls == 1 and t2.resumed_from is not None


def test_device_batch_transform_is_seeded_per_image(tmp_path):
    """The transform sees augmentation_seed(seed, epoch, index) for every image: the same image gets
    the same draws whatever batch it lands in."""
    from src.data.datasets import augmentation_seed
    from src.data.device_transforms import DeviceFlip, uniform
    seen = []

    def record(crops, seeds):
        seen.append(seeds.clone())
        return DeviceFlip(0.5)(crops, seeds)
    t = _trainer(tmp_path, epochs=1, seed=7)
    t.batch_transform = record
    t.fit()
    idx = torch.tensor(t.sampler.indices())
    assert torch.equal(torch.cat(seen), augmentation_seed(7, 0, idx))
    s = augmentation_seed(7, 0, torch.tensor([5, 9, 5]))
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(2, 3, 2, 2)
    a = DeviceFlip(0.5)([x[[0, 1]]], s[:2])[0]
    b = DeviceFlip(0.5)([x[[1, 0]]], s[[1, 0]])[0]
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    u = uniform(torch.arange(20000), 2)
    assert abs(u.mean().item() - 0.5) < 0.01 and 0.0 <= u.min() and u.max() < 1.0


# ----------------------------------------------------------------------------- resume
def test_resume_accepts_arch_aliases_and_refuses_other_archs(tmp_path):
    _trainer(tmp_path, epochs=1, arch="mocom_r18").fit()
    t = _trainer(tmp_path, epochs=2, arch="resnet18")
    t.fit()
    assert t.resumed_from.endswith("checkpoint_0000.pth.tar")
    with pytest.raises(UserError, match="written by tiny / resnet18, not tiny / resnet50"):
        _trainer(tmp_path, epochs=3, arch="resnet50").fit()


def test_resume_with_other_world_size_or_batch_remaps_the_epoch(tmp_path, caplog):
    """A mid-epoch checkpoint of 2 processes × batch 2 after 3 iterations (12 images read) resumed
    by 1 process × batch 8: the remaining images of the epoch are exactly the unread ones."""
    run = tmp_path / "run"
    _trainer(run, fire_at=6, batch=8, stop_check_every=1).fit()
    path = run / "checkpoint_interrupted.pth.tar"
    ck = load_checkpoint(str(path))
    assert (ck["epoch"], ck["iter"], ck["world_size"], ck["batch_size"]) == (1, 2, 1, 8)
    ck["iter"], ck["world_size"], ck["batch_size"] = 3, 2, 2
    torch.save(ck, path)
    t = _trainer(run, batch=8)
    t.resume()
    t.sampler.set_epoch(1, t.consumed)
    order = t.sampler.order()
    assert t.consumed == 12 and t.start_iter == 1 and t.sampler.indices() == order[12:]
    assert "split over this run's processes" in caplog.text
    from src.data.datasets import EpochSampler  # the rule itself, 2 → 3 processes
    seen = []
    for r in range(2):
        s = EpochSampler(30, 2, r, seed=3)
        s.set_epoch(4)
        seen += s.indices()[:5]  # 5 iterations of batch 1 on each of 2 ranks: positions 0..9
    rest = []
    for r in range(3):
        s = EpochSampler(30, 3, r, seed=3)
        s.set_epoch(4, consumed=10)
        rest += s.indices()
    # 20 unread images over 3 processes: every one read once, plus one repeat that pads to 21 (as
    # DistributedSampler pads); none of the 10 already read comes again
    assert set(seen) | set(rest) == set(range(30)) and len(rest) == 21 and not set(seen) & set(rest)


def _resume_worker(rank, world, root, view):
    """``view`` is what rank 1 sees at rank 0's checkpoint path: the same file ("shared"), a file of
    another run under that name ("other": a node-local directory), or nothing ("missing")."""
    import torch.distributed as dist
    from src.engine import resume as R
    if rank == 1 and view == "other":
        orig = R.load_checkpoint
        R.load_checkpoint = lambda p: orig(p.replace(os.sep + "shared" + os.sep, os.sep + "other" + os.sep))
    if rank == 1 and view == "missing":
        R.os = type("os_view", (), {"path": type("p", (), {"isfile": staticmethod(lambda p: False),
                                                             "join": staticmethod(os.path.join),
                                                             "abspath": staticmethod(os.path.abspath)})})
    t = _trainer(os.path.join(root, "shared"), epochs=3, info=DistInfo(rank=rank, world_size=world))
    try:
        t.resume()
    except UserError as e:
        return {"error": str(e)}
    sd = {k: v.clone() for k, v in t.method.state_dict().items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, sd)
    return {"epoch": t.start_epoch, "same": all(torch.equal(gathered[0][k], gathered[1][k]) for k in sd)}


def test_two_processes_resume_the_same_state_or_fail_together(tmp_path):
    """Rank 0 decides what to resume and every rank loads that file. When a rank sees another file
    under that name (node-local output directories) or none, every rank stops with the same clear
    line instead of resuming different states."""
    _trainer(tmp_path / "shared", epochs=2).fit()
    seed_everything(1)
    m = Tiny()  # another initialisation: same epochs and file names, other weights
    _trainer(tmp_path / "other", epochs=2, method=m).fit()
    res = run_distributed(_resume_worker, 2, str(tmp_path), "shared")
    assert all(r == {"epoch": 2, "same": True} for r in res)
    res = run_distributed(_resume_worker, 2, str(tmp_path), "other")
    assert res[0] == res[1] and "weights differ between ranks" in res[0]["error"]
    res = run_distributed(_resume_worker, 2, str(tmp_path), "missing")
    assert res[0] == res[1] and "[rank 1] cannot see" in res[0]["error"] and "must be shared" in res[0]["error"]


# ----------------------------------------------------------------------------- frozen modules
def test_frozen_modules_stay_out_of_optimiser_and_checkpoint(tmp_path):
    m = Tiny(teacher=True)
    assert not any(p is m.teacher.weight for p in m.trainable_parameters())
    t0 = m.teacher.weight.detach().clone()
    _trainer(tmp_path, method=m, epochs=1).fit()
    assert torch.equal(m.teacher.weight, t0) and not m.teacher.weight.requires_grad
    ck = load_checkpoint(str(tmp_path / "checkpoint_0000.pth.tar"))
    assert not any(k.startswith("module.teacher") for k in ck["state_dict"]) and "module.memory" in ck["state_dict"]
    t = _trainer(tmp_path, method=Tiny(teacher=True), epochs=2)  # resumes without the teacher keys
    t.fit()
    assert t.resumed_from is not None
    m2 = Tiny(teacher=True)
    with pytest.raises(ValueError, match="frozen module"):
        Trainer(m2, torch.optim.SGD(m2.parameters(), 0.1), lambda *a: 0.1, Blobs(),
                EngineConfig(1, 8, str(tmp_path / "x"), CheckpointPolicy(str(tmp_path / "x")), "tiny", "resnet18",
                             workers=0), DistInfo())
    _trainer(tmp_path / "keep", method=Tiny(teacher=True), epochs=1, save_frozen=True).fit()
    assert "module.teacher.weight" in load_checkpoint(str(tmp_path / "keep" / "checkpoint_0000.pth.tar"))["state_dict"]


def _bn_sync_worker(rank, world):
    from src import distributed as D
    m = Tiny()
    m.encoder_q[1].running_mean.fill_(float(rank))
    m.memory.fill_(float(rank))
    D.sync_bn_stats_(m)
    return m.encoder_q[1].running_mean.clone(), m.memory.clone()


def test_bn_statistics_sync_leaves_other_buffers_alone():
    res = run_distributed(_bn_sync_worker, 2)
    assert all(torch.equal(r[0], torch.full((8,), 0.5)) for r in res)
    assert torch.equal(res[0][1], torch.zeros(4, 8)) and torch.equal(res[1][1], torch.ones(4, 8))


# ----------------------------------------------------------------------------- loading and features
def test_load_encoder_with_head_is_strict(tmp_path):
    from src.checkpoint import load_encoder
    from src.models.backbones import build_encoder
    from src.models.heads import moco_head
    src_net = build_encoder("resnet18", moco_head(512, 16, True, -1))
    sd = {f"module.encoder_q.{k}": v for k, v in src_net.state_dict().items()}
    sd["module.queue"] = torch.zeros(16, 8)
    torch.save({"state_dict": sd}, tmp_path / "ok.pth.tar")
    net = load_encoder(str(tmp_path / "ok.pth.tar"), "resnet18", moco_head(512, 16, True, -1))
    assert net.loaded_prefix == "module.encoder_q." and net.unused_keys == []
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(net.eval()(x), src_net.eval()(x))
    del sd["module.encoder_q.fc.2.weight"]
    torch.save({"state_dict": sd}, tmp_path / "nohead.pth.tar")
    with pytest.raises(UserError, match=r"1 keys missing \(1 of them in the head 'fc'\).*fc\.2\.weight"):
        load_encoder(str(tmp_path / "nohead.pth.tar"), "resnet18", moco_head(512, 16, True, -1))


class _MultiLabel(Dataset):
    def __len__(self):
        return 7

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i)), torch.tensor([i % 2, -1, 1]), i


def test_feature_extraction_keeps_multilabel_targets():
    from src.eval.features import extract_features
    f, y = extract_features(nn.Sequential(nn.Flatten(), nn.Linear(48, 5)), _MultiLabel(), 3, 0,
                            torch.device("cpu"))
    assert f.shape == (7, 5) and y.shape == (7, 3)
    assert y[:, 0].tolist() == [0, 1, 0, 1, 0, 1, 0] and (y[:, 1] == -1).all()


def _write_cifar10(root, n=16):
    import pickle

    import numpy as np
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         b"labels": [i % 10 for i in range(n)]}, f)


def test_cifar_reader_feeds_pretraining(tmp_path):
    """The CIFAR reader follows the dataset contract: two seeded views per (epoch, index), and a
    pretraining step runs on it through the engine."""
    from src.data.cifar import CifarDataset
    from src.data.transforms import TwoCropsTransform, moco_v2_augmentation
    from src.methods.moco import MoCo
    _write_cifar10(str(tmp_path))
    ds = CifarDataset(str(tmp_path), "cifar10", True, TwoCropsTransform(moco_v2_augmentation(32)))
    assert len(ds) == 80 and ds.targets[:3] == [0, 1, 2]
    (a1, b1), t, i = ds[(5, 2)]
    (a2, b2), _, _ = ds[(5, 2)]
    (a3, _), _, _ = ds[(5, 3)]
    assert i == 5 and t == 5 and torch.equal(a1, a2) and torch.equal(b1, b2) and not torch.equal(a1, a3)
    assert a1.shape == (3, 32, 32) and not torch.equal(a1, b1)
    seed_everything(0)
    m = MoCo("resnet18", 16, 32, 0.99, 0.2, True, cifar_stem=True)
    cfg = EngineConfig(1, 16, str(tmp_path / "out"), CheckpointPolicy(str(tmp_path / "out")), "moco", "resnet18",
                       workers=0, max_iters=1)
    q0 = m.queue.clone()
    res = Trainer(m, torch.optim.SGD(m.trainable_parameters(), 0.03), lambda *a: 0.03, ds, cfg, DistInfo()).fit()
    # one step of 16 images: 16 keys enqueued; two views of one image are far closer than the random
    # queue, so the loss is well below chance, log(1 + K)
    assert int(m.queue_ptr) == 16 and not torch.equal(m.queue[:, :16], q0[:, :16])
    assert torch.equal(m.queue[:, 16:], q0[:, 16:]) and 0.01 < res["loss"] < math.log(33) - 1
