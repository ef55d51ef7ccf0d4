"""eval_linear.py: protocol presets (lr scaling, batch semantics, schedules), strict backbone loading,
end-to-end training / resume / refusal / LARC / CIFAR, and 1 vs 2 processes evaluation."""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import torch

from src.distributed import free_port
from tests.conftest import ROOT

import eval_linear  # noqa: E402
from src.engine import seed_everything
from src.eval import linear as L
from src.eval.linear_data import CifarDataset, imagenet_datasets
from src.eval.linear_presets import SWAV_STD, infer_protocol, resolve_recipe, used_options


# ----------------------------------------------------------------------------- helpers
def make_moco_checkpoint(directory: str) -> tuple[str, dict]:
    """A synthetic MoCo v2 pretraining checkpoint (DDP layout) and the method's state dict."""
    from src.methods.moco import MoCo
    torch.manual_seed(0)
    m = MoCo("resnet18", K=64, mlp=True, cifar_stem=True)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "checkpoint_0001.pth.tar")
    sd = m.state_dict()
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": {}}, path)
    return path, sd


@pytest.fixture(scope="module")
def moco_ckpt(tmp_path_factory) -> tuple[str, dict]:
    return make_moco_checkpoint(str(tmp_path_factory.mktemp("pretrain")))


def parse(argv: list[str]):
    args = eval_linear.get_parser().parse_args(argv)
    proto, _ = infer_protocol(args, used_options(argv))
    return args, proto


def run_main(argv: list[str]) -> None:
    eval_linear.main(argv)


def common(data: str, ckpt: str, out: str, *extra: str) -> list[str]:
    return [data, "-a", "resnet18", "--pretrained", ckpt, "--dump_path", out, "-j", "0", "--image_size", "32",
            "-b", "8", "--max_iters", "2", "-p", "100", *extra]


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- presets
def test_sogclr_global_batch_and_linear_scaling():
    args, proto = parse(["--data", "x", "--data_name", "imagenet1000", "-b", "1024"])
    assert proto == "sogclr"
    r = resolve_recipe(args, proto, world_size=4, local_world_size=4)
    assert r.lr == pytest.approx(0.4) and r.per_process_batch == 256 and r.global_batch == 1024
    assert (r.scheduler, r.epochs, r.optimizer, r.wd) == ("cosine", 90, "sgd", 0.0)
    assert L.epoch_lr(r, 0) == pytest.approx(0.4)
    assert L.epoch_lr(r, 45) == pytest.approx(0.2)          # ½(1+cos(π/2))
    assert L.epoch_lr(r, 30) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi / 3)))


def test_caco_seed_command_larc_and_scaling():
    argv = ["-a", "resnet50", "--lr", "0.025", "--batch-size", "4096", "--pretrained", "ck",
            "--dist-url", "tcp://localhost:10001", "--multiprocessing-distributed", "--world-size", "1",
            "--rank", "0", "--data", "x"]
    args, proto = parse(argv)
    assert proto == "caco"
    r = resolve_recipe(args, proto, world_size=8, local_world_size=8)
    assert r.lr == pytest.approx(0.4) and r.optimizer == "larc" and r.scheduler == "cosine" and r.epochs == 100
    assert r.per_process_batch == 512 and r.global_batch == 4096
    assert resolve_recipe(*parse(["--protocol", "caco", "x"])[:1], "caco").lr == pytest.approx(0.025 * 16)


def test_lorac_per_gpu_batch_std_and_step():
    argv = ["--data_path", "x", "--arch", "resnet50", "--lr", "6.0", "--scheduler_type", "step", "--dump_path", "o",
            "--pretrained", "p", "--batch_size", "512", "--wd", "0.0", "--num_classes", "1000"]
    args, proto = parse(argv)
    assert proto == "lorac"
    r = resolve_recipe(args, proto, world_size=4, local_world_size=4)
    assert r.per_process_batch == 512 and r.global_batch == 2048 and r.lr == 6.0
    assert r.std == SWAV_STD and r.milestones == [60, 80]
    assert [L.epoch_lr(r, e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([6, 6, 0.6, 0.6, 0.06, 0.06])
    args, _ = parse(argv + ["--scheduler_type", "cosine", "--final_lr", "0.1"])
    r = resolve_recipe(args, "lorac")
    assert L.epoch_lr(r, 50) == pytest.approx(0.1 + 0.5 * 5.9)


def test_moco_disco_pcl_presets():
    args, proto = parse(["x", "-b", "256"])
    assert proto == "moco"
    r = resolve_recipe(args, proto, world_size=2, local_world_size=2)
    assert (r.lr, r.per_process_batch, r.global_batch, r.milestones, r.gamma) == (30.0, 128, 256, [60, 80], 0.1)
    r = resolve_recipe(parse(["x", "--protocol", "disco"])[0], "disco")
    assert r.lr == 3.0 and r.gamma == 0.5 and len(r.milestones) == 11
    assert L.epoch_lr(r, 4) == 3.0 and L.epoch_lr(r, 5) == 1.5 and L.epoch_lr(r, 80) == pytest.approx(3 * 0.5 ** 11)
    args, proto = parse(["x", "--id", "ImageNet_linear", "-b", "256"])
    r = resolve_recipe(args, proto)
    assert proto == "pcl" and r.lr == 5.0 and L.epoch_lr(r, 60) == pytest.approx(0.5)
    # explicit flags win over the preset; an empty --schedule is a constant lr
    r = resolve_recipe(parse(["x", "--protocol", "sogclr", "--lr", "1", "-b", "256", "--schedule", "3"])[0], "sogclr")
    assert r.scheduler == "step" and r.lr == 1.0 and L.epoch_lr(r, 3) == pytest.approx(0.1)
    r = resolve_recipe(parse(["x", "--schedule"])[0], "moco")
    assert r.scheduler == "constant" and L.epoch_lr(r, 99) == 30.0
    r = resolve_recipe(parse(["x", "--dataset", "cifar10"])[0], "disco")
    assert (r.lr, r.scheduler, r.epochs, r.per_process_batch) == (3.0, "constant", 200, 256)
    from src.errors import UserError
    with pytest.raises(UserError, match="not divisible"):
        resolve_recipe(parse(["x", "-b", "255"])[0], "moco", world_size=2, local_world_size=2)


SEED_COMMANDS = {  # linear-eval commands of the seed READMEs, script name changed
    "lorac": "--data_path D --arch resnet50 --lr 6.0 --scheduler_type step --dump_path L "
             "--pretrained E/checkpoint.pth.tar --batch_size 512 --wd 0.0 --num_classes 1000",
    "sogclr": "--dist-url tcp://localhost:10001 --multiprocessing-distributed --world-size 1 --rank 0 --workers 32 "
              "--pretrained /p/run/checkpoint_0799.pth.tar --data_name imagenet1000 --data D --save_dir S",
    "caco": "-a resnet50 --lr 0.025 --batch-size 4096 --pretrained C --dist-url tcp://localhost:10001 "
            "--multiprocessing-distributed --world-size 1 --rank 0 --data D",
    "disco": "-a resnet50 --learning-rate 3.0 --batch-size 256 --dist-url tcp://localhost:10001 "
             "--multiprocessing-distributed --world-size 1 --rank 0 --pretrained C D",
    "moco": "-a resnet50 --lr 30.0 --batch-size 256 --pretrained C --dist-url tcp://localhost:10001 "
            "--multiprocessing-distributed --world-size 1 --rank 0 D",
    "pcl": "--pretrained C -a resnet50 --lr 5 --batch-size 256 --id ImageNet_linear --dist-url tcp://localhost:10001 "
           "--multiprocessing-distributed --world-size 1 --rank 0 D",
}
EXPECTED = {"lorac": (6.0, 512, 4096, "step"), "sogclr": (0.4, 128, 1024, "cosine"),
            "caco": (0.4, 512, 4096, "cosine"), "disco": (3.0, 32, 256, "step"), "moco": (30.0, 32, 256, "step"),
            "pcl": (5.0, 32, 256, "step")}


@pytest.mark.parametrize("name", sorted(SEED_COMMANDS))
def test_seed_commands_parse_to_their_protocol(name, tmp_path):
    args, proto = parse(SEED_COMMANDS[name].split())
    assert proto == name
    lr, per_proc, glob, sched = EXPECTED[name]
    r = resolve_recipe(args, proto, world_size=8, local_world_size=8)  # one node of 8 GPUs
    assert (r.lr, r.per_process_batch, r.global_batch, r.scheduler) == (pytest.approx(lr), per_proc, glob, sched)
    if name == "sogclr":  # SogCLR writes under <save_dir>/linear_eval_<pretraining run dir>
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "checkpoint_0799.pth.tar").write_bytes(b"")
        args.data_opt, args.pretrained = str(tmp_path), str(tmp_path / "run" / "checkpoint_0799.pth.tar")
        args.save_dir = str(tmp_path / "S")
        eval_linear.resolve_paths(args)
        assert args.dump_path == os.path.join(str(tmp_path / "S"), "linear_eval_run")


# ----------------------------------------------------------------------------- data
def test_train_list_subset_and_val_classes(tiny_folder, tmp_path):
    classes = sorted(os.listdir(os.path.join(tiny_folder, "train")))
    keep = classes[1:3]
    lines = []
    for c in keep:
        f = sorted(os.listdir(os.path.join(tiny_folder, "train", c)))[0]
        lines.append(f"train/{c}/{f} 0")
    lst = tmp_path / "subset.txt"
    lst.write_text("\n".join(lines) + "\n")
    tr, va = imagenet_datasets(tiny_folder, 32, (0.229, 0.224, 0.225), str(lst))
    assert tr.classes == keep and len(tr) == 2 and va.classes == keep
    assert len(va) == 8 and sorted(set(va.targets)) == [0, 1]
    for p, t in va.samples:  # labels follow the folder names of the training classes
        assert os.path.basename(os.path.dirname(p)) == keep[t]


def write_fake_cifar10(root: str, n_train: int = 20, n_test: int = 10) -> None:
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(os.path.join(d, f"data_batch_{i}"), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (n_train // 5, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n_train // 5))}, f)
    with open(os.path.join(d, "test_batch"), "wb") as f:
        pickle.dump({b"data": rng.integers(0, 255, (n_test, 3072), dtype=np.uint8),
                     b"labels": list(range(n_test))}, f)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


@pytest.mark.slow
def test_cifar10_dataset_and_run(tmp_path):
    write_fake_cifar10(str(tmp_path / "cifar"))
    from src.eval.linear_data import cifar_transforms
    ttf, vtf = cifar_transforms(32, (0.229, 0.224, 0.225))
    ds = CifarDataset(str(tmp_path / "cifar"), "cifar10", False, vtf)
    assert len(ds) == 10 and ds.classes[3] == "c3" and ds.targets == list(range(10))
    x, y, i = ds[7]
    assert x.shape == (3, 32, 32) and y == 7 and i == 7
    tr = CifarDataset(str(tmp_path / "cifar"), "cifar10", True, ttf, seed=1)
    assert len(tr) == 20 and torch.equal(tr[(3, 0)][0], tr[(3, 0)][0]) and not torch.equal(tr[(3, 0)][0], tr[(3, 1)][0])
    out = str(tmp_path / "out")
    run_main([str(tmp_path / "cifar"), "--dataset", "cifar10", "-a", "resnet18", "--cifar_stem", "--dump_path", out,
              "-j", "0", "--image_size", "32", "-b", "8", "--max_iters", "1", "--epochs", "1", "--protocol", "disco"])
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["lr"] == 3.0 and res["val_images"] == 10 and 0 <= res["last_acc1"] <= 100
    with pytest.raises(SystemExit) as e:
        run_main([str(tmp_path), "--dataset", "cifar100", "--dump_path", out + "2"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- backbone
def test_backbone_loads_strictly_and_equals_encoder_q(moco_ckpt):
    path, sd = moco_ckpt
    net = L.frozen_backbone(path, "resnet18")
    assert net.conv1.kernel_size == (3, 3) and not net.training
    got = net.state_dict()
    want = {k[len("encoder_q."):]: v for k, v in sd.items()
            if k.startswith("encoder_q.") and k.split(".")[1] != "fc"}
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert all(not p.requires_grad for p in net.parameters())
    ref = L.snapshot(net)
    with torch.no_grad():
        net.layer1[0].conv1.weight.add_(1e-3)
    with pytest.raises(AssertionError, match="sanity check failed"):
        L.sanity_check(net, ref)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_resume_and_results(tiny_folder, moco_ckpt, tmp_path):
    path, _ = moco_ckpt
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_main(common(tiny_folder, path, a, "--epochs", "2", "--lr", "0.5"))
    res = json.load(open(os.path.join(a, "results.json")))
    log = read_jsonl(os.path.join(a, "log.jsonl"))
    assert [r["epoch"] for r in log] == [0, 1]
    assert res["best_acc1"] == max(r["val_acc1"] for r in log) and res["last_acc1"] == log[-1]["val_acc1"]
    assert res["best_epoch"] == max(range(2), key=lambda e: (log[e]["val_acc1"], -e))
    for k in ("best_acc1", "last_acc1", "last_acc5"):
        assert 0.0 <= res[k] <= 100.0 and (res[k] * 16 / 100) == pytest.approx(round(res[k] * 16 / 100))
    ck = torch.load(os.path.join(a, "checkpoint.pth.tar"), weights_only=False)
    assert ck["kind"] == "linear_head" and ck["epoch"] == 2 and set(ck["state_dict"]) == {"linear.weight", "linear.bias"}
    seed_everything(0)
    init = L.LinearClassifier(512, 4)
    assert not torch.equal(ck["state_dict"]["linear.weight"], init.linear.weight)  # the head trained
    assert init.linear.weight.std().item() == pytest.approx(0.01, rel=0.2) and not init.linear.bias.any()

    # interrupted after 1 epoch, resumed to 2: same head as the uninterrupted run
    run_main(common(tiny_folder, path, b, "--epochs", "1", "--lr", "0.5"))
    assert json.load(open(os.path.join(b, "results.json")))["resumed_from_epoch"] == 0
    run_main(common(tiny_folder, path, b, "--epochs", "2", "--lr", "0.5"))
    res_b = json.load(open(os.path.join(b, "results.json")))
    assert res_b["resumed_from_epoch"] == 1
    assert [r["epoch"] for r in read_jsonl(os.path.join(b, "log.jsonl"))] == [0, 1]
    ck_b = torch.load(os.path.join(b, "checkpoint.pth.tar"), weights_only=False)
    for k in ck["state_dict"]:
        assert torch.allclose(ck["state_dict"][k], ck_b["state_dict"][k], atol=1e-6), k
    assert res_b["last_acc1"] == res["last_acc1"] and res_b["best_acc1"] == res["best_acc1"]


@pytest.mark.slow
def test_refuses_pretraining_dump_path(tiny_folder, moco_ckpt, capsys):
    path, _ = moco_ckpt
    for dump in (os.path.dirname(path), os.path.join(os.path.dirname(path), ".")):
        with pytest.raises(SystemExit) as e:
            run_main(common(tiny_folder, path, dump))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "pretrained" in err[0], err
    assert sorted(os.listdir(os.path.dirname(path))) == ["checkpoint_0001.pth.tar"]  # nothing written there


def test_refuses_non_head_checkpoint_in_dump(tmp_path, moco_ckpt):
    from src.errors import UserError
    d = tmp_path / "lorac_pretrain"
    d.mkdir()
    torch.save({"epoch": 3, "state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}}, d / "checkpoint.pth.tar")
    with pytest.raises(UserError, match="not a linear-head checkpoint"):
        L.check_dump_path(str(d), moco_ckpt[0])


@pytest.mark.slow
def test_caco_protocol_larc(tiny_folder, moco_ckpt, tmp_path):
    out = str(tmp_path / "caco")
    run_main(common(tiny_folder, moco_ckpt[0], out, "--protocol", "caco", "--lr", "0.025", "--epochs", "1"))
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["protocol"] == "caco" and res["lr"] == pytest.approx(0.025 * 8 / 256)
    ck = torch.load(os.path.join(out, "checkpoint.pth.tar"), weights_only=False)
    # LARC: the bias starts at 0 (norm 0) → raw SGD steps; the weight moved by a LARC-scaled step
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.025 * 8 / 256)
    assert ck["state_dict"]["linear.bias"].abs().sum() > 0
    from src.checkpoint import load_backbone
    from tests import recompute
    top1 = recompute.linear_top1(load_backbone(moco_ckpt[0], "resnet18"), ck["state_dict"],
                                 recompute.image_split(tiny_folder, "val"))
    assert res["last_acc1"] == pytest.approx(top1, abs=1e-4)


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tiny_folder, moco_ckpt, tmp_path):
    """-b 8 per node: 2 processes × 4 images read the same 8 images per step as 1 process × 8
    (EpochSampler strides one permutation), DDP averages the gradients → the same head and the
    same validation numbers (val sharded over the 2 processes and summed)."""
    path, _ = moco_ckpt
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_main(common(tiny_folder, path, one, "--epochs", "1", "--lr", "0.5", "--val_batch_size", "5"))
    ck = os.path.join(one, "checkpoint.pth.tar")
    ev = str(tmp_path / "eval")
    run_main(common(tiny_folder, path, ev, "--evaluate", "--resume", ck))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "eval_linear.py",
                        *common(tiny_folder, path, two, "--epochs", "1", "--lr", "0.5", "--val_batch_size", "5")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "processes 2" in p.stdout and "batch 4/process 8 global" in p.stdout, p.stdout[-2000:]
    r1 = json.load(open(os.path.join(one, "results.json")))
    r2 = json.load(open(os.path.join(two, "results.json")))
    assert r1["val_images"] == r2["val_images"] == 16 and r1["global_batch"] == r2["global_batch"] == 8
    assert r1["last_acc1"] == r2["last_acc1"] and r1["last_acc5"] == r2["last_acc5"]
    assert r1["last_val_loss"] == pytest.approx(r2["last_val_loss"], rel=1e-4)
    h1 = torch.load(ck, weights_only=False)["state_dict"]
    h2 = torch.load(os.path.join(two, "checkpoint.pth.tar"), weights_only=False)["state_dict"]
    for k in h1:
        assert torch.allclose(h1[k], h2[k], rtol=1e-4, atol=1e-6), k
    l1, l2 = read_jsonl(os.path.join(one, "log.jsonl")), read_jsonl(os.path.join(two, "log.jsonl"))
    assert l1[0]["train_acc1"] == l2[0]["train_acc1"] and l1[0]["train_loss"] == pytest.approx(l2[0]["train_loss"], rel=1e-4)
    ev_res = json.load(open(os.path.join(ev, "eval_results.json")))
    assert ev_res["eval_acc1"] == r1["last_acc1"] and ev_res["eval_loss"] == pytest.approx(r1["last_val_loss"], rel=1e-6)


def test_disco_seed_linear_commands_infer_disco():
    """DisCo's README spells --learning-rate: with only the script name changed, its linear command
    gets DisCo's recipe (lr 3, ×0.5 at 11 milestones); main_lincls_semi (a --train_list subset)
    steps ×0.5 at [60, 80] (disco_pcl_evals.md C2, C3). MoCo's --lr spelling stays moco."""
    seed = ["-a", "efficientb0", "--learning-rate", "3.0", "--batch-size", "256", "--dist-url", "tcp://localhost:10001",
            "--multiprocessing-distributed", "--world-size", "1", "--rank", "0", "--pretrained", "ck", "/dev/shm/"]
    args, proto = parse(seed)
    assert proto == "disco"
    r = resolve_recipe(args, proto, world_size=8, local_world_size=8)
    assert (r.lr, r.gamma, r.per_process_batch, r.milestones) == (3.0, 0.5, 32, [5, 10, 15, 20, 25, 30, 35, 40, 45, 60, 80])
    args, proto = parse(seed + ["--train_list", "1percent.txt"])
    r = resolve_recipe(args, proto)
    assert (r.milestones, r.gamma) == ([60, 80], 0.5)
    assert [L.epoch_lr(r, e) for e in (59, 60, 80)] == pytest.approx([3.0, 1.5, 0.75])
    assert parse(["-a", "resnet50", "--lr", "30.0", "--batch-size", "256", "/data"])[1] == "moco"


def test_stop_signal_mid_epoch_resumes_the_probe_exactly(tiny_folder, moco_ckpt, tmp_path, monkeypatch):
    """eval_linear.py runs on the engine's TrainStep and StopSignal: SIGUSR1 during epoch 0 writes
    the head checkpoint with its iteration, and the rerun ends with the same head as an
    uninterrupted run (same data order and per-image augmentation)."""
    import signal

    from src.engine import TrainStep
    path, _ = moco_ckpt
    args = ["-b", "2", "--epochs", "2", "--lr", "0.5", "--max_iters", "100"]  # 16 iterations per epoch
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    run_main(common(tiny_folder, path, ref, *args))

    class Firing(TrainStep):
        calls = 0

        def __call__(self, *a, **k):
            Firing.calls += 1
            if Firing.calls == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().__call__(*a, **k)
    monkeypatch.setattr(eval_linear, "TrainStep", Firing)
    run_main(common(tiny_folder, path, run, *args))
    ck = torch.load(os.path.join(run, "checkpoint.pth.tar"), weights_only=False)
    assert (ck["epoch"], ck["iter"]) == (0, 10) and not os.path.exists(os.path.join(run, "results.json"))
    monkeypatch.setattr(eval_linear, "TrainStep", TrainStep)
    run_main(common(tiny_folder, path, run, *args))
    a = torch.load(os.path.join(ref, "checkpoint.pth.tar"), weights_only=False)["state_dict"]
    b = torch.load(os.path.join(run, "checkpoint.pth.tar"), weights_only=False)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.load(open(os.path.join(run, "results.json")))["last_acc1"] == \
        json.load(open(os.path.join(ref, "results.json")))["last_acc1"]
