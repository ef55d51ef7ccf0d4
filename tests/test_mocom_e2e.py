"""End to end: the seed's three commands (MoCo-M and LORAC pretraining with
``python -m torch.distributed.launch --nproc_per_node=2``, then ``eval_linear.py`` on the result), and
resume across the LORAC switch epoch (moco_m_lorac.md §5, seed 000_e4473e00faee4cec)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.dist_utils import launch as _launch

pytestmark = pytest.mark.slow



def seed_pretrain_args(data: str, dump: str, epochs: int, lorac: bool) -> list[str]:
    """The seed's flags with only the data path, sizes and epochs made small (+ workers 0)."""
    a = ["--data_path", data, "--nmb_crops", "3", "2", "--size_crops", "32", "16",
         "--min_scale_crops", "0.14", "0.05", "--max_scale_crops", "1.", "0.14", "--crops_for_assign", "0", "1",
         "--moco-dim", "128", "--moco-k", "64", "--moco-m", "0.999", "--temperature", "0.2", "--mlp", "true",
         "--epochs", str(epochs), "--batch_size", "4", "--base_lr", "1.8", "--final_lr", "0.018"]
    if lorac:
        a += ["--lorac_beta", "15.", "--epoch_lorac_starts", "1"]
    a += ["--wd", "1e-6", "--warmup_epochs", "0", "--checkpoint_freq", "1", "--dist_url", "tcp://localhost:40000",
          "--arch", "mocom_r18", "--use_fp16", "true", "--sync_bn", "pytorch", "--dump_path", dump,
          "--workers", "0", "--print_freq", "2"]
    return a


def _check_pretrain_dir(dump: str, epochs: int, K: int = 64, global_batch: int = 8, iters: int = 4) -> dict:
    ck = torch.load(os.path.join(dump, "checkpoint.pth.tar"), weights_only=True)
    assert ck["epoch"] == epochs and "optimizer" in ck
    sd = ck["state_dict"]
    assert sd["module.queue"].shape == (2, 128, K)
    assert int(sd["module.queue_ptr"]) == (epochs * iters * global_batch) % K
    assert any(k.startswith("module.encoder_q.") for k in sd) and any(k.startswith("module.encoder_k.") for k in sd)
    assert set(k.split(".")[1] for k in sd) == {"encoder_q", "encoder_k", "queue", "queue_ptr"}
    assert "module.encoder_q.fc.0.weight" in sd and sd["module.encoder_q.fc.2.weight"].shape == (128, 512)
    for e in range(epochs):
        assert os.path.isfile(os.path.join(dump, "checkpoints", f"ckp-{e}.pth"))
    assert os.path.isfile(os.path.join(dump, "args.json"))
    with open(os.path.join(dump, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {"ckpt": ck, "epochs": [r for r in recs if "iter" not in r]}


def test_seed_commands_end_to_end(tiny_folder, tmp_path):
    data = os.path.join(tiny_folder, "train")       # the seed passes ImageNet/train
    mocom, lorac, lin = str(tmp_path / "mocom"), str(tmp_path / "lorac"), str(tmp_path / "lincls")
    for d in (mocom, lorac):
        os.makedirs(d)   # the seed runs `mkdir -p ${EXPERIMENT_PATH}`

    r = _launch("main_moco_m.py", seed_pretrain_args(data, mocom, 1, lorac=False))
    out = _check_pretrain_dir(mocom, 1)
    assert "processes 2" in r.stdout and "pairing hardcoded1" in r.stdout

    _launch("main_lorac.py", seed_pretrain_args(data, lorac, 2, lorac=True))
    out = _check_pretrain_dir(lorac, 2)
    ep = out["epochs"]
    assert [e["epoch"] for e in ep] == [0, 1]
    assert ep[0]["rank"] == 0.0 and 2.23 < ep[1]["rank"] <= 5.0   # mean nuclear norm after the switch
    # the two ranks kept identical queues (same gathered keys): rank 0 saved; reload both planes' norms
    q = out["ckpt"]["state_dict"]["module.queue"]
    assert torch.allclose(q.norm(dim=1), torch.ones(2, 64), atol=1e-5)

    # seed command 3: eval_linear.py on the LORAC checkpoint (resnet18 here, resnet50 in the seed)
    r = _launch("eval_linear.py", ["--data_path", tiny_folder, "--arch", "resnet18", "--lr", "6.0",
                                   "--scheduler_type", "step", "--dump_path", lin,
                                   "--pretrained", os.path.join(lorac, "checkpoint.pth.tar"),
                                   "--batch_size", "8", "--wd", "0.0", "--num_classes", "4", "--epochs", "1",
                                   "--image_size", "32", "--workers", "0"])
    logs = r.stdout + r.stderr
    for dirpath, _, files in os.walk(lin):
        logs += "".join(open(os.path.join(dirpath, f)).read() for f in files if f.endswith(".log"))
    assert "key prefix 'module.encoder_q.'" in logs
    from src.checkpoint import load_backbone
    net = load_backbone(os.path.join(lorac, "checkpoint.pth.tar"), "resnet18")
    assert net.loaded_prefix == "module.encoder_q."
    sd = out["ckpt"]["state_dict"]
    assert torch.equal(net.layer4[1].bn2.weight, sd["module.encoder_q.layer4.1.bn2.weight"])


def _lorac(dump: str, epochs: int, data: str):
    from main_lorac import main as main_lorac
    main_lorac(["--data_path", data, "--nmb_crops", "3", "2", "--size_crops", "16", "8",
                "--min_scale_crops", "0.14", "0.05", "--max_scale_crops", "1.", "0.14", "--moco-dim", "16",
                "--moco-k", "16", "--epochs", str(epochs), "--batch_size", "4", "--base_lr", "1.8",
                "--final_lr", "0.018", "--lorac_beta", "15.", "--epoch_lorac_starts", "2", "--warmup_epochs", "1",
                "--start_warmup", "0.1", "--checkpoint_freq", "2", "--arch", "mocom_r18", "--use_fp16", "false",
                "--sync_bn", "pytorch", "--dump_path", dump, "--workers", "0", "--max_iters", "2",
                "--shuffle_bn_groups", "2", "--print_freq", "1"])
    return torch.load(os.path.join(dump, "checkpoint.pth.tar"), weights_only=True)


def test_resume_across_lorac_switch_is_exact(tiny_folder, tmp_path):
    """A run stopped after epoch 1 (its ``checkpoints/ckp-1.pth``, i.e. the state a kill after epoch 1
    leaves) and resumed with the same flags ends with exactly the weights, queue and optimiser state
    of an uninterrupted run; epoch 2 is past the switch (``--epoch_lorac_starts 2``). The flags must be
    the same: ``--epochs`` sets the length of the per-iteration cosine."""
    import shutil
    data = os.path.join(tiny_folder, "train")
    a, b = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = _lorac(a, 3, data)
    assert sorted(os.listdir(os.path.join(a, "checkpoints"))) == ["ckp-1.pth", "ckp-2.pth"]
    os.makedirs(b)
    shutil.copyfile(os.path.join(a, "checkpoints", "ckp-1.pth"), os.path.join(b, "checkpoint.pth.tar"))
    resumed = _lorac(b, 3, data)      # auto-resume from b/checkpoint.pth.tar at epoch 2
    assert resumed["epoch"] == straight["epoch"] == 3
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    s1, s2 = straight["optimizer"]["state"], resumed["optimizer"]["state"]
    assert s1.keys() == s2.keys() and len(s1) > 0
    for i in s1:
        assert torch.equal(s1[i]["momentum_buffer"], s2[i]["momentum_buffer"])
    logs = [json.loads(x) for x in open(os.path.join(b, "log.jsonl"))]
    ep = [r for r in logs if "iter" not in r]
    assert [r["epoch"] for r in ep] == [2] and ep[0]["rank"] > 2.23
    full = [json.loads(x) for x in open(os.path.join(a, "log.jsonl"))]
    ep_a = [r for r in full if "iter" not in r]
    assert ep_a[1]["rank"] == 0.0 and ep_a[2]["rank"] == ep[0]["rank"] and ep_a[2]["loss"] == ep[0]["loss"]
