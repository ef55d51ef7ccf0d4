"""End to end: the seed's Tab5 commands (``main_swav.py``, ``main_swav_distill.py``) with
``python -m torch.distributed.launch --nproc_per_node=2`` on a generated folder at small crop sizes,
stopped by a real SIGUSR1 in the middle of an epoch and resumed by re-running the command (identical
weights, optimiser and per-rank queues to an uninterrupted run), then the seed's ``eval_linear.py --data_path … --pretrained …/ckp-N.pth`` on the result."""
from __future__ import annotations

import os

import pytest
import torch

from tests.dist_utils import launch, launch_and_signal

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
            "--hidden_mlp", "64", "--workers", "0", "--print_freq", "1", "--max_iters", "3",
            "--stop_check_every", "1"]


def _ckpt(path: str) -> dict:
    return torch.load(path, weights_only=True)


def _straight_and_resumed(script: str, args_fn, tmp_path, name: str) -> tuple[dict, str, str]:
    """Run 3 epochs; run them again, stopped by a real SIGUSR1 to rank 0 in the middle of epoch 1 (queue
    full and in use), then resumed by re-running the same command: both must end identical."""
    a, b = str(tmp_path / f"{name}_straight"), str(tmp_path / f"{name}_resumed")
    r = launch(script, args_fn(a) + ["--checkpoint_freq", "2"])
    log = r.stdout + r.stderr
    assert "trimmed to 16" in log                       # 20 → a multiple of 4 x 2
    straight = _ckpt(os.path.join(a, "checkpoint.pth.tar"))
    assert sorted(os.listdir(os.path.join(a, "checkpoints"))) == ["ckp-0.pth", "ckp-2.pth"]   # epoch % 2 == 0, last
    zero = _ckpt(os.path.join(a, "checkpoints", "ckp-0.pth"))
    assert zero["epoch"] == 1 and zero["state_dict"]["module.queue"].abs().sum() == 0   # starts at epoch 1
    # stopped after the poll of epoch 1, iteration 1 (the row of iteration 0 is logged before its poll)
    out = launch_and_signal(script, args_fn(b) + ["--checkpoint_freq", "2"], os.path.join(b, "log.jsonl"),
                            when=lambda row: row.get("epoch") == 1 and row.get("iter") == 0)
    ck = _ckpt(os.path.join(b, "checkpoint_interrupted.pth.tar"))
    assert ck["epoch"] == 1 and 1 <= ck["iter"] <= 2, (ck["epoch"], ck["iter"])
    filled = ck["state_dict"]["module.queue"].abs().sum(-1).gt(0).sum(-1)   # rows per (rank, assigned crop)
    assert torch.equal(filled, torch.full((2, 2), 4 * ck["iter"]))         # the 8-row queue, filled 4 per step
    assert not os.path.exists(os.path.join(b, "checkpoints", "ckp-2.pth"))
    r2 = launch(script, args_fn(b) + ["--checkpoint_freq", "2"])   # auto-resume mid-epoch 1
    log2 = r2.stdout + r2.stderr
    assert f"iteration {ck['iter']}" in log2
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
    return straight, a, log + out + log2


def _linear_eval(tiny_folder: str, ckpt: str, arch: str, out: str) -> str:
    """The seed's evaluation command (``--data_path`` root, ``--pretrained …/ckp-N.pth``), small."""
    r = launch("eval_linear.py", ["--arch", arch, "--data_path", tiny_folder, "--pretrained", ckpt,
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
    ck, dump, log = _straight_and_resumed("main_swav.py", lambda d: seed_args(data, d), tmp_path, "swav")
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
        "main_swav_distill.py", lambda d: seed_args(data, d) + ["--pretrained", teacher], tmp_path, "distill")
    assert "teacher SWAVresnet50" in log and "against the raw teacher projection" in log
    assert ck["method"] == "swav_distill" and not any("teacher" in k for k in ck["state_dict"])
    assert ck["teacher_info"]["sha256"]
    import json
    recs = [json.loads(x) for x in open(os.path.join(dump, "log.jsonl"))]
    ep = [r for r in recs if "iter" not in r and "loss_mse" in r]
    assert len(ep) == 3 and all(r["loss"] == pytest.approx(r["loss_swav"] + r["loss_mse"], rel=1e-4) for r in ep)
    assert all(r["teacher_norm"] > 1.5 for r in ep)    # the raw (un-normalised) teacher projection
    _linear_eval(tiny_folder, os.path.join(dump, "checkpoints", "ckp-2.pth"), "resnet18", str(tmp_path / "lin"))
