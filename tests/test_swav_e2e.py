"""End to end: the seed's Tab5 commands (``main_swav.py``, ``main_swav_distill.py``) with
``python -m torch.distributed.launch --nproc_per_node=2`` on a generated folder at small crop sizes,
resumed from the state a kill after epoch 1 leaves (identical weights and queue to an uninterrupted
run), then the seed's ``eval_linear.py --data_path … --pretrained …/ckp-N.pth`` on the result."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.test_mocom_e2e import _launch

pytestmark = pytest.mark.slow


def seed_args(data: str, dump: str, arch: str = "resnet18") -> list[str]:
    """The Tab5 flags with only paths, sizes, epochs and queue/freeze lengths made small (+ workers 0)."""
    return ["--data_path", data, "--base_lr", "0.6", "--final_lr", "0.0006", "--warmup_epochs", "0",
            "--crops_for_assign", "0", "1", "--size_crops", "32", "16", "--nmb_crops", "2", "2",
            "--min_scale_crops", "0.14", "0.05", "--max_scale_crops", "1.", "0.14", "--use_fp16", "true",
            "--freeze_prototypes_niters", "5", "--queue_length", "20", "--epoch_queue_starts", "1",
            "--dump_path", dump, "--sync_bn", "pytorch", "--temperature", "0.1", "--epsilon", "0.05",
            "--sinkhorn_iterations", "3", "--feat_dim", "128", "--nmb_prototypes", "30", "--epochs", "3",
            "--batch_size", "4", "--wd", "0.000001", "--arch", arch, "--use_fp16", "true",
            "--hidden_mlp", "64", "--workers", "0", "--print_freq", "1", "--max_iters", "2"]


def _ckpt(path: str) -> dict:
    return torch.load(path, weights_only=True)


def _straight_and_resumed(script: str, args_fn, tmp_path, name: str, freq: str) -> tuple[dict, str, str]:
    """Run 3 epochs; resume a copy of the epoch-1 checkpoint (the state a kill after epoch 1 leaves:
    the run's ``checkpoint.pth.tar`` at that moment) to the end; both must be identical."""
    a, b = str(tmp_path / f"{name}_straight"), str(tmp_path / f"{name}_resumed")
    r = _launch(script, args_fn(a) + ["--checkpoint_freq", freq])
    log = r.stdout + r.stderr
    assert "trimmed to 16" in log                       # 20 → a multiple of 4 x 2
    straight = _ckpt(os.path.join(a, "checkpoint.pth.tar"))
    one = _ckpt(os.path.join(a, "checkpoints", "ckp-1.pth"))
    assert one["epoch"] == 2 and one["state_dict"]["module.queue"].abs().sum(-1).gt(0).all()  # full after epoch 1 (2 x 4)
    os.makedirs(b)
    shutil.copyfile(os.path.join(a, "checkpoints", "ckp-1.pth"), os.path.join(b, "checkpoint.pth.tar"))
    r2 = _launch(script, args_fn(b) + ["--checkpoint_freq", freq])   # auto-resume at epoch 2
    resumed = _ckpt(os.path.join(b, "checkpoint.pth.tar"))
    assert resumed["epoch"] == straight["epoch"] == 3
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    s1, s2 = straight["optimizer"]["state"], resumed["optimizer"]["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i]["momentum_buffer"], s2[i]["momentum_buffer"]) for i in s1)
    q = straight["state_dict"]["module.queue"]
    assert q.shape == (2, 2, 8, 128) and torch.allclose(q.norm(dim=-1), torch.ones(2, 2, 8), atol=1e-3)
    assert not torch.equal(q[0], q[1])                 # per-rank queues, both kept
    return straight, a, log + r2.stdout + r2.stderr


def _linear_eval(tiny_folder: str, ckpt: str, arch: str, out: str) -> str:
    """The seed's evaluation command (``--data_path`` root, ``--pretrained …/ckp-N.pth``), small."""
    r = _launch("eval_linear.py", ["--arch", arch, "--data_path", tiny_folder, "--pretrained", ckpt,
                                   "--dump_path", out, "--epochs", "1", "--image_size", "32", "--workers", "0",
                                   "--num_classes", "4"])
    logs = r.stdout + r.stderr
    for dirpath, _, files in os.walk(out):
        logs += "".join(open(os.path.join(dirpath, f)).read() for f in files if f.endswith(".log"))
    assert "protocol swav" in logs and "key prefix 'module.'" in logs
    assert os.path.isfile(os.path.join(out, "results.json"))
    return logs


def test_main_swav_seed_command(tiny_folder, tmp_path):
    data = os.path.join(tiny_folder, "train")
    ck, dump, log = _straight_and_resumed("main_swav.py", lambda d: seed_args(data, d), tmp_path, "swav", "1")
    assert "processes 2" in log and "queue 16 global (8 per process) from epoch 1" in log
    sd = ck["state_dict"]
    assert {"module.conv1.weight", "module.projection_head.3.weight", "module.prototypes.weight"} <= set(sd)
    assert ck["method"] == "swav" and sd["module.prototypes.weight"].shape == (30, 128)
    ckp = os.path.join(dump, "checkpoints", "ckp-2.pth")
    _linear_eval(tiny_folder, ckp, "resnet18", str(tmp_path / "lin"))
    from src.checkpoint import load_backbone
    net = load_backbone(ckp, "resnet18")
    assert net.loaded_prefix == "module." and torch.equal(net.layer4[1].bn2.weight, sd["module.layer4.1.bn2.weight"])


def _swav_teacher(path: str) -> None:
    """A SwAV-format raw state dict like ``swav_800ep_pretrain.pth.tar`` (``module.*`` + prototypes)."""
    from src.models.teacher import build_teacher
    torch.manual_seed(1)
    t = build_teacher("SWAVresnet50", dim=128)
    sd = {f"module.{k}": v for k, v in t.state_dict().items()}
    sd["module.prototypes.weight"] = torch.randn(3000, 128)
    torch.save(sd, path)


def test_main_swav_distill_seed_command(tiny_folder, tmp_path):
    data = os.path.join(tiny_folder, "train")
    teacher = str(tmp_path / "swav_800ep_pretrain.pth.tar")
    _swav_teacher(teacher)
    ck, dump, log = _straight_and_resumed(
        "main_swav_distill.py", lambda d: seed_args(data, d) + ["--pretrained", teacher], tmp_path, "distill", "1")
    assert "teacher SWAVresnet50" in log and "against the raw teacher projection" in log
    assert ck["method"] == "swav_distill" and not any("teacher" in k for k in ck["state_dict"])
    assert ck["teacher_info"]["sha256"]
    import json
    recs = [json.loads(x) for x in open(os.path.join(dump, "log.jsonl"))]
    ep = [r for r in recs if "iter" not in r and "loss_mse" in r]
    assert len(ep) == 3 and all(r["loss"] == pytest.approx(r["loss_swav"] + r["loss_mse"], rel=1e-4) for r in ep)
    assert all(r["teacher_norm"] > 1.5 for r in ep)    # the raw (un-normalised) teacher projection
    from src.checkpoint import load_backbone   # what eval_linear.py --pretrained …/ckp-2.pth loads (tested above)
    assert load_backbone(os.path.join(dump, "checkpoints", "ckp-2.pth"), "resnet18").loaded_prefix == "module."
