"""main_pcl.py end to end: the PCL seed command (shared/seeds/004) on a generated folder with tiny K, 2
processes, across the warm-up epoch; stopped by a signal in the middle of the epoch after an E-step
and resumed: no re-clustering, and the same final state as an uninterrupted run."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from src.checkpoint import load_backbone, load_checkpoint
from src.distributed import free_port

SEED = ("-a resnet50 --lr 0.03 --batch-size 256 --temperature 0.2 --mlp --aug-plus --cos "
        "--dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 "
        "--exp-dir experiment_pcl")
# sizes: 32 images, 2 processes x 2 images -> 8 iterations per epoch; epoch 0 warm-up, epoch 1 PCL
SIZES = {"-a": "resnet18", "--batch-size": "4", "--exp-dir": None}
EXTRA = ["--epochs", "2", "--warmup-epoch", "1", "--num-cluster", "12,16", "--pcl-r", "8", "--nproc", "2",
         "--image_size", "32", "-j", "0", "-p", "4"]


def command(data: str, out: str) -> list[str]:
    argv = shlex.split(SEED)
    for flag, value in {**SIZES, "--exp-dir": out, "--dist-url": f"tcp://127.0.0.1:{free_port()}"}.items():
        argv[argv.index(flag) + 1] = value
    return [sys.executable, "main_pcl.py", *argv, *EXTRA, data]


def _workers(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(c) for c in f.read().split()]
    out = []
    for k in kids:
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(k)
        except FileNotFoundError:
            pass
    return out


def _run(argv, cwd):
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.mark.slow
def test_seed_command_two_processes_stop_mid_epoch_after_estep_and_resume(tmp_path, tiny_folder, repo_root):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    log = _run(command(tiny_folder, ref), repo_root)
    assert "processes 2" in log and "PCL v2: r 8, K [12, 16], warm-up 1 epochs" in log
    assert "epoch 0 E-step" not in log and "epoch 1 E-step" in log
    rows = [json.loads(x) for x in open(os.path.join(ref, "log.jsonl"))]
    ep = {r["epoch"]: r for r in rows if "epoch_time_s" in r}
    assert "loss_proto" not in ep[0] and ep[1]["loss_proto"] > 0 and ep[1]["loss"] > ep[1]["loss_inst"]
    a = load_checkpoint(os.path.join(ref, "checkpoint_0001.pth.tar"))  # the last epoch is always written
    sd = a["state_dict"]
    assert a["epoch"] == 2 and int(sd["module.cluster_epoch"]) == 1 and sd["module.queue"].shape == (128, 8)
    assert sd["module.centroids_1"].shape == (16, 128) and sd["module.im2cluster_0"].shape == (32,)
    assert abs(float(sd["module.density_0"].mean()) - 0.2) < 1e-5
    assert load_backbone(os.path.join(ref, "checkpoint_0001.pth.tar"), "resnet18").loaded_prefix == "module.encoder_q."

    # the same run, stopped by SIGUSR1 (to one worker; the poll is collective) right after epoch 1's
    # E-step: the stop is taken at the next poll (global step 9 = epoch 1, iteration 1)
    p = subprocess.Popen(command(tiny_folder, run), cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    train_log, t0, sent = os.path.join(run, "logs", "train.log"), time.time(), False
    while p.poll() is None and time.time() - t0 < 300:
        if os.path.isfile(train_log) and "epoch 1 E-step" in open(train_log).read():
            os.kill(_workers(p.pid)[-1], signal.SIGUSR1)
            sent = True
            break
        time.sleep(0.01)
    out = p.communicate(timeout=300)[0]
    assert sent and p.returncode == 0, out[-3000:]
    ck = load_checkpoint(os.path.join(run, "checkpoint_interrupted.pth.tar"))
    assert (ck["epoch"], ck["iter"]) == (1, 2) and int(ck["state_dict"]["module.cluster_epoch"]) == 1
    assert not os.path.exists(os.path.join(run, "checkpoint_0001.pth.tar"))

    log2 = _run(command(tiny_folder, run), repo_root)
    assert "resumed from" in log2 and "iteration 2" in log2
    assert "clustering restored from the checkpoint (no E-step)" in log2 and "E-step:" not in log2
    b = load_checkpoint(os.path.join(run, "checkpoint_0001.pth.tar"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)


def test_bad_flags_are_one_line(tmp_path, tiny_folder, capsys):
    import main_pcl
    for extra, msg in ((["--pcl-r", "16", "--num-cluster", "20"], "--pcl-r 16 must be smaller than K - N = 20 - 8"),
                       (["--pcl-r", "8", "--num-cluster", "40"], "asks for 40 clusters but the training set has 32"),
                       (["--num-cluster", "a,b"], "comma-separated")):
        argv = ["-a", "resnet18", "-b", "8", "--image_size", "32", "-j", "0", "--exp-dir", str(tmp_path), *extra,
                tiny_folder]
        with pytest.raises(SystemExit) as e:
            main_pcl.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert main_pcl.get_parser().parse_args([tiny_folder]).num_cluster == "25000,50000,100000"
