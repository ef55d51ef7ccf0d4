"""Faults a cluster user meets (issue 14), each provoked for real: a non-finite loss, a checkpoint write
that fails (file-size limit) or is killed half-way, unreadable newest checkpoints, SLURM requeue."""
from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from src.checkpoint import load_checkpoint
from src.engine import CheckpointPolicy
from src.engine.loop import NonFiniteLoss
from tests.test_engine import Tiny, _trainer


class NaNAt(Tiny):
    """Tiny whose loss is NaN at the given forward calls (1-based)."""

    def __init__(self, bad: set[int]):
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, crops, index=None, **kw):
        self.calls += 1
        out = super().forward(crops, index, **kw)
        if self.calls in self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out


def _weights(m) -> dict:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


# ----------------------------------------------------------------------------- non-finite loss
def test_nonfinite_loss_stops_naming_the_iteration_and_keeps_the_last_checkpoint(tmp_path):
    # 4 iterations per epoch; forward 6 = epoch 1, iteration 1; printed only at the epoch end
    t = _trainer(tmp_path, method=NaNAt({6}), print_freq=1000)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at epoch 1 iteration 1: stopping .*Last good checkpoint: "
                       r".*checkpoint_0000\.pth\.tar"):
        t.fit()
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".tar")) == ["checkpoint_0000.pth.tar"]
    assert load_checkpoint(str(tmp_path / "checkpoint_0000.pth.tar"))["epoch"] == 1


def test_skip_nonfinite_skips_up_to_n_steps(tmp_path):
    m = NaNAt({3, 6})
    seen = []
    orig = m.after_step

    def after_step(step):
        seen.append((step.iteration, step.applied, step.nonfinite, _weights(m.encoder_q)))
        orig(step)
    m.after_step = after_step
    t = _trainer(tmp_path / "a", method=m, skip_nonfinite=2, epochs=2)
    t.fit()
    assert t.nonfinite_skipped == 2
    flags = [(it, applied, nf) for it, applied, nf, _ in seen]
    assert flags[2] == (2, False, True) and flags[5] == (1, False, True) and flags[1] == (1, True, False)
    for k, v in seen[1][3].items():   # the skipped step left the weights as the step before had them
        assert torch.equal(v, seen[2][3][k]), k
    assert not torch.equal(seen[2][3]["0.weight"], seen[3][3]["0.weight"])   # the next step trains again
    rows = open(tmp_path / "a" / "log.jsonl").read()
    assert '"nonfinite_skipped": 2' in rows
    with pytest.raises(NonFiniteLoss, match=r"more than --skip_nonfinite 1 non-finite steps"):
        _trainer(tmp_path / "b", method=NaNAt({3, 6}), skip_nonfinite=1, epochs=2).fit()


# ----------------------------------------------------------------------------- checkpoint writes
CHILD = textwrap.dedent("""
    import os, resource, signal, sys, time
    sys.path.insert(0, {root!r})
    import torch
    from tests.test_engine import _trainer
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "kill":   # the 2nd checkpoint write stalls half-way; the parent SIGKILLs us then
        real, n = torch.save, [0]
        def slow(obj, f, *a, **k):
            n[0] += 1
            if n[0] == 2:
                f.write(b"PK\\x03\\x04" + b"x" * 1000); f.flush(); open(out + "/.writing", "w").close()
                time.sleep(60)
            return real(obj, f, *a, **k)
        torch.save = slow
    else:                # the disk is full for the 2nd write: a file-size limit below its size
        real, n = torch.save, [0]
        def limited(obj, f, *a, **k):
            n[0] += 1
            if n[0] == 2:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
            return real(obj, f, *a, **k)
        torch.save = limited
    from src.errors import cli_main
    cli_main(lambda: _trainer(out).fit())()
""")


def _child(mode: str, out: str) -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen([sys.executable, "-c", CHILD.format(root=root), mode, out], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path):
    p = _child("full", str(tmp_path))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, out + err
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "cannot write the checkpoint of epoch 1" in lines[0] and "File too large" in lines[0]
    assert "checkpoint_0000.pth.tar) is intact" in lines[0]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]   # the failed write cleaned up
    assert load_checkpoint(str(tmp_path / "checkpoint_0000.pth.tar"))["epoch"] == 1
    _trainer(tmp_path).fit()   # the disk has room again: the run resumes and finishes
    assert load_checkpoint(str(tmp_path / "checkpoint_0002.pth.tar"))["epoch"] == 3


def test_kill_during_a_checkpoint_write_loses_nothing(tmp_path):
    import time
    p = _child("kill", str(tmp_path))
    t0 = time.time()
    while not os.path.exists(tmp_path / ".writing") and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.02)
    assert os.path.exists(tmp_path / ".writing"), p.communicate()[1][-2000:]
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]     # the half file is there ...
    assert not os.path.exists(tmp_path / "checkpoint_0001.pth.tar")       # ... under a name never resumed
    t = _trainer(tmp_path)
    t.fit()
    assert t.resumed_from == str(tmp_path / "checkpoint_0000.pth.tar")
    assert load_checkpoint(str(tmp_path / "checkpoint_0002.pth.tar"))["epoch"] == 3


def test_auto_resume_skips_unreadable_newest_checkpoints(tmp_path, caplog):
    _trainer(tmp_path, epochs=2).fit()
    good = tmp_path / "checkpoint_0000.pth.tar"
    data = (tmp_path / "checkpoint_0001.pth.tar").read_bytes()
    (tmp_path / "checkpoint_0001.pth.tar").write_bytes(data[: len(data) // 2])      # truncated
    (tmp_path / "checkpoint_interrupted.pth.tar").write_text("not a checkpoint")   # garbage
    t = _trainer(tmp_path, epochs=2)
    with caplog.at_level("WARNING", logger="ssl"):
        t.resume()
    assert t.resumed_from == str(good) and t.start_epoch == 1
    msgs = caplog.text
    assert "skipping" in msgs and "checkpoint_0001.pth.tar" in msgs and "checkpoint_interrupted.pth.tar" in msgs
    assert f"resuming from {good}, the newest readable checkpoint" in msgs
    # the SwAV layout: a truncated checkpoint.pth.tar falls back to the newest checkpoints/ckp-N.pth copy
    swav = tmp_path / "swav"
    pol = lambda: CheckpointPolicy(str(swav), filename=lambda e: "checkpoint.pth.tar",  # noqa: E731
                                   fixed_resume_name="checkpoint.pth.tar",
                                   copies=lambda e, n: [str(swav / "checkpoints" / f"ckp-{e}.pth")] if e == 0 else [])
    _trainer(swav, epochs=2, policy=pol()).fit()
    (swav / "checkpoint.pth.tar").unlink()
    (swav / "checkpoint.pth.tar").write_bytes(b"\x00" * 100)
    t = _trainer(swav, epochs=2, policy=pol())
    t.resume()
    assert t.resumed_from == str(swav / "checkpoints" / "ckp-0.pth") and t.start_epoch == 1
    # nothing readable at all: one line, nothing overwritten
    for f in os.listdir(swav / "checkpoints"):
        (swav / "checkpoints" / f).write_bytes(b"junk")
    with pytest.raises(Exception, match=r"auto-resume: no readable checkpoint in .* move them away"):
        _trainer(swav, epochs=2, policy=pol()).resume()


# ----------------------------------------------------------------------------- SLURM requeue
def test_requeue_after_a_stop_under_slurm(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    res = _trainer(tmp_path / "run", fire_at=5, stop_check_every=1, requeue=True).fit()
    assert res["interrupted"] == 1.0
    assert (tmp_path / "calls").read_text().split() == ["requeue", "4242"]
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint_interrupted.pth.tar"))["iter"] == 1
    # not requeued without the flag
    _trainer(tmp_path / "run2", fire_at=5, stop_check_every=1).fit()
    assert (tmp_path / "calls").read_text().split() == ["requeue", "4242"]


# ----------------------------------------------------------------------------- data faults
def _faulty_folder(root) -> dict:
    """A train/val folder with every kind of bad file next to good ones; returns what is where."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"good{i}.jpg")
    (root / "train" / "empty_class").mkdir()                 # a class folder without images
    t = root / "train" / "a"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(t / "trunc.jpg")
    data = (t / "trunc.jpg").read_bytes()
    (t / "trunc.jpg").write_bytes(data[: len(data) // 2])   # truncated JPEG
    (t / "zero.jpg").write_bytes(b"")                       # zero bytes
    (t / "notes.jpg").write_text("this is not an image")   # not an image
    b = root / "train" / "b"
    Image.fromarray(np.full((32, 32), 90, np.uint8), mode="L").save(b / "gray.png")
    Image.new("CMYK", (32, 32), (0, 255, 0, 0)).save(b / "cmyk.jpg")
    Image.fromarray(np.full((32, 32), 0x8000, np.uint16)).save(b / "deep16.png")   # 16-bit PNG
    return {"unreadable": ["trunc.jpg", "zero.jpg", "notes.jpg"]}


def test_bad_images_are_skipped_or_converted_counted_and_reported(tmp_path, caplog):
    import numpy as np
    from src.data.datasets import ImageDataset
    _faulty_folder(tmp_path)
    with caplog.at_level("WARNING"):
        ds = ImageDataset(str(tmp_path / "train"))
    assert "hold no images (empty_class)" in caplog.text
    names = [os.path.basename(p) for p, _ in ds.samples]
    with caplog.at_level("WARNING"):
        got = {n: ds[i][0] for i, n in enumerate(names)}
    assert ds.num_skipped == 3
    assert caplog.text.count("skipping unreadable image") == 3   # once per file, never decoded again
    assert np.asarray(got["deep16.png"]).max() == 128 and got["deep16.png"].mode == "RGB"   # 0x8000 → 128, not white
    assert np.asarray(got["gray.png"]).tolist()[0][0] == [90, 90, 90]
    assert got["cmyk.jpg"].mode == "RGB" and np.asarray(got["cmyk.jpg"])[..., 0].mean() > 200   # C=0,M=255 → red/magenta
    for bad in ("trunc.jpg", "zero.jpg", "notes.jpg"):   # replaced by the next readable image
        assert got[bad].size == (32, 32)


def test_training_runs_through_bad_images_and_reports_them(tmp_path):
    import json
    import main_moco
    _faulty_folder(tmp_path / "data")
    out = tmp_path / "out"
    main_moco.main(["-a", "resnet18", "--batch-size", "4", "--moco-k", "16", "--image_size", "32", "-j", "0",
                    "--epochs", "1", "--output_dir", str(out), "--lr", "0.01", str(tmp_path / "data")])
    rows = [json.loads(x) for x in open(out / "log.jsonl")]
    ep = [r for r in rows if "epoch_time_s" in r]
    assert len(ep) == 1 and ep[0]["skipped_images"] == 3


# ----------------------------------------------------------------------------- checkpoint faults
class _Evil:
    """Unpickling it would run a shell command that leaves a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(d, marker: str) -> dict[str, str]:
    """name → path of each kind of bad checkpoint, and a good resnet18 one of another arch's shape."""
    import torchvision
    os.makedirs(d, exist_ok=True)
    paths = {k: os.path.join(d, f"{k}.pth.tar") for k in ("other_arch", "truncated", "not_a_checkpoint", "evil")}
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in
                               torchvision.models.resnet50().state_dict().items()}, "arch": "resnet50",
                "epoch": 1, "optimizer": {}}, paths["other_arch"])
    data = open(paths["other_arch"], "rb").read()
    with open(paths["truncated"], "wb") as f:
        f.write(data[: len(data) // 3])
    with open(paths["not_a_checkpoint"], "w") as f:
        f.write("epoch,loss\n1,0.5\n")
    torch.save({"state_dict": {}, "payload": _Evil(marker)}, paths["evil"])
    return paths


ENTRY_POINTS = {   # script → argv with {ck}, {data}, {out} to fill; all use resnet18
    "eval_linear": "-a resnet18 --pretrained {ck} --dump_path {out} --epochs 1 --image_size 32 -j 0 {data}",
    "eval_knn": "-a resnet18 --pretrained {ck} --dump_path {out} --image_size 32 -j 0 {data}",
    "scripts/export_backbone": "-a resnet18 --pretrained {ck} --output {out}/bb.pth",
    "main_moco": "-a resnet18 --resume {ck} --batch-size 4 --moco-k 16 --image_size 32 -j 0 --epochs 1 "
                 "--output_dir {out} {data}",
    "main_swav": "--arch resnet18 --resume {ck} --data_path {data}/train --batch_size 4 --size_crops 32 "
                 "--nmb_prototypes 8 --hidden_mlp 16 --feat_dim 8 --epochs 1 --workers 0 --dump_path {out}",
    "main_swav_distill": "--arch resnet18 --pretrained {ck} --data_path {data}/train --batch_size 4 --size_crops 32 "
                         "--nmb_prototypes 8 --hidden_mlp 16 --feat_dim 128 --epochs 1 --workers 0 --dump_path {out}",
}


WHY = {"other_arch": r"does not fit (arch 'resnet18'|--teacher_arch)|was written by \w+ / resnet50, not",
       "truncated": "truncated or corrupt", "not_a_checkpoint": "not a PyTorch checkpoint",
       "evil": "would run code when loaded: refused"}


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_bad_checkpoints_are_refused_in_one_line_and_nothing_runs(script, tmp_path, tiny_folder, capsys):
    import importlib
    import shlex
    marker = str(tmp_path / "PWNED")
    paths = _bad_checkpoints(tmp_path / "ck", marker)
    mod = importlib.import_module(script.replace("/", "."))
    for kind, ck in paths.items():
        argv = shlex.split(ENTRY_POINTS[script].format(ck=ck, data=tiny_folder, out=tmp_path / f"out_{kind}"))
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, (kind, err)
        assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0], (kind, err)
        assert re.search(WHY[kind], err[0]), (kind, err)
        assert not os.path.exists(marker), kind
