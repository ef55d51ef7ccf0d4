"""main_moco.py end to end: the DisCo-seed baseline commands, torchrun, kill + resume."""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from src.distributed import free_port
import torch

from src.checkpoint import load_backbone, load_checkpoint
from tests import recompute

# The DisCo seed's baseline commands (shared/seeds/003_*.txt), data path and epochs to be substituted.
DISCO_BASELINES = [
    "-a resnet50 --batch-size 256 --learning-rate 0.03 --mlp --moco-t 0.2 --aug-plus --cos --epochs 200 --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 --hidden 2048 /dev/shm/",
    "-a resnet101 --batch-size 256 --learning-rate 0.03 --mlp --moco-t 0.2 --aug-plus --cos --epochs 200 --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 --hidden 2048 /dev/shm/",
    "-a resnet152 --batch-size 256 --learning-rate 0.03 --mlp --moco-t 0.2 --aug-plus --cos --epochs 800 --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 --hidden 2048 /dev/shm/",
    "-a mobilenetv3 --batch-size 256 --learning-rate 0.03 --mlp --moco-t 0.2 --aug-plus --cos --epochs 200 --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 --hidden 512 /dev/shm",
    "-a efficientb0 --batch-size 256 --learning-rate 0.03 --mlp --moco-t 0.2 --aug-plus --cos --epochs 200 --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 --hidden 1280",
    "-a efficientb1 --batch-size 256 --learning-rate 0.03 --mlp --moco-t 0.2 --aug-plus --cos --epochs 200 --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0  --hidden 1280  /dev/shm",
    "-a resnet18 --batch-size 256 --learning-rate 0.03 --mlp --moco-t 0.2 --aug-plus --cos --epochs 200 --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 --hidden 1280 /dev/shm/",
    "-a resnet34 --batch-size 256 --learning-rate 0.03 --mlp --moco-t 0.2 --aug-plus --cos --epochs 200 --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 --hidden 1280 /dev/shm/",
]
R18_BASELINE = DISCO_BASELINES[6]
SMALL = ["--batch-size", "8", "--moco-k", "64", "--image_size", "32", "-j", "0", "--print-freq", "2"]


def _command(seed: str, data: str, epochs: int) -> list[str]:
    """The seed command with only its data path and epoch count replaced."""
    argv = shlex.split(seed)
    argv = [a for a in argv if not a.startswith("/dev/shm")]
    argv[argv.index("--epochs") + 1] = str(epochs)
    return argv + [data]


@pytest.mark.parametrize("seed", DISCO_BASELINES, ids=lambda s: s.split()[1])
def test_every_disco_baseline_command_parses_and_builds(seed, tiny_folder):
    import main_moco
    from src.methods.moco import MoCo
    args = main_moco.get_parser().parse_args(_command(seed, tiny_folder, 1))
    assert args.multiprocessing_distributed and args.world_size == 1 and args.rank == 0
    assert args.lr == 0.03 and args.mlp and args.aug_plus and args.cos and args.moco_t == 0.2
    m = MoCo(args.arch, args.moco_dim, 256, args.moco_m, args.moco_t, args.mlp, args.hidden)
    head = m.encoder_q.fc if hasattr(m.encoder_q, "fc") and args.arch.startswith("resnet") else m.encoder_q.classifier
    feat = {"resnet18": 512, "resnet34": 512, "mobilenetv3": 1280, "efficientb0": 1280, "efficientb1": 1280}.get(args.arch, 2048)
    assert head[0].weight.shape == (args.hidden, feat) and head[2].weight.shape == (128, args.hidden)
    with torch.no_grad():
        m.eval()
        assert m.encoder_q(torch.randn(2, 3, 64, 64)).shape == (2, 128)


def _run(argv, cwd, env=None, timeout=300):
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_disco_r18_baseline_single_process_then_eval(tmp_path, tiny_folder, repo_root):
    out = tmp_path / "pre"
    _run([sys.executable, "main_moco.py", *_command(R18_BASELINE, tiny_folder, 2), *SMALL, "--output_dir", str(out),
          "--knn_freq", "1"], repo_root)
    ck = load_checkpoint(str(out / "checkpoint_0001.pth.tar"))
    assert ck["epoch"] == 2 and ck["arch"] == "resnet18"
    assert {"state_dict", "optimizer", "epoch", "arch"} <= set(ck)
    sd = ck["state_dict"]
    assert sd["module.queue"].shape == (128, 64) and int(sd["module.queue_ptr"]) == (2 * 4 * 8) % 64
    assert sd["module.encoder_q.fc.0.weight"].shape == (1280, 512)
    assert (out / "checkpoint_0000.pth.tar").exists() and (out / "args.json").exists()
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    ep = [x for x in lines if "knn_top1" in x]
    assert len(ep) == 2
    # InfoNCE over 1 positive + K=64 negatives with cosine logits / 0.2 lies in
    # [log(1 + K e^(-2/T)), log(1 + K e^(2/T))]; each epoch line is the mean of its two equal windows
    # (4 iterations of 8 images, --print-freq 2), and every accuracy is a count over 16 or 32 images
    lo, hi = math.log(1 + 64 * math.exp(-10)), math.log(1 + 64 * math.exp(10))
    windows = [x for x in lines if "iter" in x]
    epochs = [x for x in lines if "iter" not in x and "loss" in x]
    assert len(windows) == 4 and len(epochs) == 2 and all(lo < x["loss"] < hi for x in windows)
    for e, row in enumerate(epochs):
        mine = [x for x in windows if x["epoch"] == e]
        for key in ("loss", "acc1", "acc5"):
            assert row[key] == pytest.approx(sum(x[key] for x in mine) / 2, abs=1e-5), key
        assert all(x["acc1"] * 16 / 100 == pytest.approx(round(x["acc1"] * 16 / 100)) for x in mine)
    # the monitor's epoch-1 kNN top-1 (k=20, t=0.2) recomputed from the epoch-1 weights by a loop
    bank, queries = recompute.image_split(tiny_folder, "train"), recompute.image_split(tiny_folder, "val")
    ref_bb = load_backbone(str(out / "checkpoint_0001.pth.tar"), "resnet18")
    assert ep[-1]["knn_top1"] == pytest.approx(recompute.knn_top1(ref_bb, bank, queries, 20, 0.2), abs=1e-4)
    # the backbone of the checkpoint loads strictly (query encoder, not the momentum one)
    bb = load_backbone(str(out / "checkpoint_0001.pth.tar"), "resnet18")
    assert torch.equal(bb.state_dict()["layer4.1.bn2.weight"], sd["module.encoder_q.layer4.1.bn2.weight"])
    # ... and in both evaluation scripts
    ck1 = str(out / "checkpoint_0001.pth.tar")
    r = _run([sys.executable, "eval_knn.py", "-a", "resnet18", "--pretrained", ck1, "--image_size", "32", "-j", "0",
              "--nb_knn", "5", "--dump_path", str(tmp_path / "knn"), tiny_folder], repo_root)
    assert "module.encoder_q." in r.stdout + r.stderr
    knn = json.loads((tmp_path / "knn" / "knn_results.json").read_text())
    assert knn["query_images"] == 16
    assert knn["knn"]["5"]["top1"] == pytest.approx(recompute.knn_top1(ref_bb, bank, queries, 5, 0.2), abs=1e-4)
    r = _run([sys.executable, "eval_linear.py", "-a", "resnet18", "--pretrained", ck1, "--image_size", "32", "-j", "0",
              "--epochs", "1", "-b", "8", "--lr", "3.0", "--dump_path", str(tmp_path / "lin"), tiny_folder], repo_root)
    assert "module.encoder_q." in r.stdout + r.stderr
    res = json.loads((tmp_path / "lin" / "results.json").read_text())
    head = torch.load(str(tmp_path / "lin" / "checkpoint.pth.tar"), weights_only=False)["state_dict"]
    assert res["last_acc1"] == pytest.approx(recompute.linear_top1(ref_bb, head, queries), abs=1e-4)
    assert res["best_acc1"] == res["last_acc1"]      # one epoch


@pytest.mark.slow
def test_disco_r18_baseline_torchrun_two_processes_elastic_restart(tmp_path, tiny_folder, repo_root):
    """torchrun with --max-restarts 1 (c10d rendezvous: torch's static one, used with --master_port, cannot
    re-form a gloo group after a restart): one worker SIGKILLed after the first checkpoint; torchrun restarts
    the group, which resumes from that checkpoint and finishes with the numbers of an uninterrupted run."""
    from tests.dist_utils import worker_pids
    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}", "--rdzv-id", "elastic",
            "main_moco.py", *_command(R18_BASELINE, tiny_folder, 2), *SMALL, "--output_dir", str(out)]
    p = subprocess.Popen(argv, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0, killed = time.time(), None
    while p.poll() is None and time.time() - t0 < 240 and killed is None:
        if (out / "checkpoint_0000.pth.tar").exists():
            killed = worker_pids(p.pid, "main_moco.py")[1]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    log = p.communicate(timeout=300)[0]
    assert killed and p.returncode == 0, log[-3000:]
    ck = load_checkpoint(str(out / "checkpoint_0001.pth.tar"))
    # per-process batch 4 × 2 processes; 32 images → 4 iterations per epoch, 8 keys per step
    assert ck["epoch"] == 2 and int(ck["state_dict"]["module.queue_ptr"]) == (2 * 4 * 8) % 64
    train_log = (out / "logs" / "train.log").read_text()
    assert "processes 2" in train_log and "batch 4 per process, 8 global" in train_log
    assert "resumed from" in train_log and "checkpoint_0000.pth.tar at epoch 1" in train_log


@pytest.mark.slow
def test_killed_run_resumes_to_identical_state(tmp_path, tiny_folder, repo_root):
    # loader workers and 2 shuffle-BN groups: the workers must not draw from the RNG that the
    # shuffle permutations use, or the resumed run would diverge
    argv = [sys.executable, "main_moco.py", *_command(R18_BASELINE, tiny_folder, 3), *SMALL, "-j", "2",
            "--shuffle_bn_groups", "2"]
    ref, run = tmp_path / "ref", tmp_path / "killed"
    _run(argv + ["--output_dir", str(ref)], repo_root)
    # start the same run, kill -9 it as soon as its first checkpoint exists, then run it again
    p = subprocess.Popen(argv + ["--output_dir", str(run)], cwd=repo_root, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (run / "checkpoint_0000.pth.tar").exists() and time.time() - t0 < 240:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "checkpoint_0002.pth.tar").exists(), "the run finished before it could be killed"
    r = _run(argv + ["--output_dir", str(run)], repo_root)
    assert "resumed from" in r.stdout
    a = load_checkpoint(str(ref / "checkpoint_0002.pth.tar"))
    b = load_checkpoint(str(run / "checkpoint_0002.pth.tar"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.mark.slow
def test_slurm_launch_two_tasks(tmp_path, tiny_folder, repo_root):
    """Two processes started as ``srun`` would start them (SLURM_* variables, MASTER_ADDR/PORT)."""
    out, port = tmp_path / "slurm", free_port()
    procs = []
    for r in range(2):
        env = {**os.environ, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
               "SLURM_NTASKS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "main_moco.py", *_command(R18_BASELINE, tiny_folder, 1),
                                       *SMALL, "--output_dir", str(out)], cwd=repo_root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert "processes 2" in (out / "logs" / "train.log").read_text()
    assert int(load_checkpoint(str(out / "checkpoint_0000.pth.tar"))["state_dict"]["module.queue_ptr"]) == 32


def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path, tiny_folder):
    """A loss that turns NaN in epoch 1 stops the run with NonFiniteLoss; epoch 0's checkpoint stays."""
    from src.data.datasets import ImageDataset
    from src.data.transforms import TwoCropsTransform, eval_transform
    from src.engine import CheckpointPolicy, EngineConfig, NonFiniteLoss, Trainer
    from src.distributed import DistInfo
    from src.methods.moco import MoCo

    class Exploding(MoCo):
        def forward(self, crops, index=None):
            out = super().forward(crops, index)
            if self.epoch >= 1:
                out["loss"] = out["loss"] * float("nan")
            return out

        def on_epoch_start(self, epoch, engine=None):
            self.epoch = epoch

    torch.manual_seed(0)
    m = Exploding("resnet18", dim=16, K=32, mlp=False)
    ds = ImageDataset(os.path.join(tiny_folder, "train"), TwoCropsTransform(eval_transform(32)))
    out = tmp_path / "nan"
    cfg = EngineConfig(epochs=3, batch_size=8, output_dir=str(out), checkpoint=CheckpointPolicy(str(out)),
                       method_name="moco", arch="resnet18", workers=0, print_freq=2)
    opt = torch.optim.SGD(m.encoder_q.parameters(), lr=0.01)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at epoch 1 .*Last good checkpoint: .*checkpoint_0000"):
        Trainer(m, opt, lambda e, i, n: 0.01, ds, cfg, DistInfo()).fit()
    assert (out / "checkpoint_0000.pth.tar").exists() and not (out / "checkpoint_0001.pth.tar").exists()


@pytest.mark.slow
def test_channels_last_same_numbers_and_tensorboard(tmp_path, tiny_folder, repo_root):
    """``--channels_last`` changes the memory format only: same losses; TensorBoard events written."""
    logs = {}
    for name, extra in (("std", []), ("cl", ["--channels_last"])):
        out = tmp_path / name
        _run([sys.executable, "main_moco.py", *_command(R18_BASELINE, tiny_folder, 1), *SMALL, *extra,
              "--output_dir", str(out)], repo_root)
        logs[name] = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
        assert all(x["img_per_s"] > 0 and x["lr"] == 0.03 for x in logs[name])
        assert json.loads((out / "args.json").read_text())["hidden"] == 1280
    a = [x["loss"] for x in logs["std"]]
    b = [x["loss"] for x in logs["cl"]]
    # the first window (before any update) agrees to float precision; later ones drift only by the
    # different summation order of the channels_last kernels
    assert len(a) == len(b) == 3 and a[0] == pytest.approx(b[0], rel=1e-5) and a == pytest.approx(b, rel=2e-2)


def test_signal_mid_epoch_checkpoint_resumes_exactly(tmp_path, tiny_folder):
    """SIGUSR1 in the middle of epoch 1 → checkpoint_interrupted.pth.tar (epoch 1, iter 2) and a
    clean return; running again resumes at that iteration and ends with the same state as an
    uninterrupted run (data order, augmentation, RNG, optimizer, queue)."""
    import signal as sig
    from src.data.datasets import ImageDataset
    from src.data.transforms import TwoCropsTransform, moco_v2_augmentation
    from src.distributed import DistInfo
    from src.engine import CheckpointPolicy, EngineConfig, Trainer, seed_everything
    from src.methods.moco import MoCo
    from src.optim import MoCoEpochLR

    class Signalling(MoCo):
        calls = 0
        fire_at = None

        def forward(self, crops, index=None):
            Signalling.calls += 1
            if Signalling.calls == Signalling.fire_at:
                os.kill(os.getpid(), sig.SIGUSR1)
            return super().forward(crops, index)

    def trainer(out, fire_at=None):
        Signalling.calls, Signalling.fire_at = 0, fire_at
        seed_everything(0)
        m = Signalling("resnet18", 16, 64, 0.99, 0.2, True, -1, shuffle_groups=2)
        ds = ImageDataset(os.path.join(tiny_folder, "train"), TwoCropsTransform(moco_v2_augmentation(32)))
        opt = torch.optim.SGD(m.encoder_q.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
        cfg = EngineConfig(epochs=3, batch_size=8, output_dir=str(out), checkpoint=CheckpointPolicy(str(out)),
                           method_name="moco", arch="resnet18", workers=0, print_freq=1, stop_check_every=1)
        return Trainer(m, opt, MoCoEpochLR(0.03, 3, True), ds, cfg, DistInfo())

    trainer(tmp_path / "ref").fit()
    run = tmp_path / "run"
    res = trainer(run, fire_at=6).fit()  # 4 iterations per epoch: the 6th forward is epoch 1, iteration 1
    assert res == {"interrupted": 1.0, "next_iter": 2.0}
    ck = load_checkpoint(str(run / "checkpoint_interrupted.pth.tar"))
    assert (ck["epoch"], ck["iter"]) == (1, 2) and not (run / "checkpoint_0001.pth.tar").exists()
    t = trainer(run)
    t.fit()
    assert not (run / "checkpoint_interrupted.pth.tar").exists()  # superseded by checkpoint_0001
    a = load_checkpoint(str(tmp_path / "ref" / "checkpoint_0002.pth.tar"))
    b = load_checkpoint(str(run / "checkpoint_0002.pth.tar"))
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
