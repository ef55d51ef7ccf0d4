"""``main_sogclr.py`` end to end: the seed's commands (script name, data path and sizes changed),
exact resume, ImageNet-100 selection, 2 gloo processes, and the seed's linear command."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import main_sogclr
from src.checkpoint import load_backbone

pytestmark = pytest.mark.slow

# the ImageNet-1K seed command with sizes changed (+ --image_size 32, -a resnet18, small projector)
SEED = ("--lr=.075 --epochs=2 --batch-size=16 --learning-rate-scaling=sqrt --loss_type dcl --gamma 0.9 "
        "--multiprocessing-distributed --world-size 1 --rank 0 --workers 0 --crop-min=.08 --wd=1e-6 "
        "--dist-url tcp://localhost:10001 --print-freq 1000 -a resnet18 --image_size 32 --dim 16 --mlp-dim 64")


def _ckpt(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def seed_run(tiny_folder, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("sogclr_save"))
    main_sogclr.main(SEED.split() + ["--data_name", "imagenet1000", "--data", tiny_folder, "--save_dir", save])
    return save


def test_seed_command_writes_official_layout(seed_run):
    runs = glob.glob(os.path.join(seed_run, "20221005_imagenet1000_resnet18_sogclr-16-64_bz_16_E2_WR10_lr_0.300_"
                                            "sqrt_wd_1e-06_t_0.1_g_0.9_lars"))
    assert len(runs) == 1
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(runs[0], "checkpoint_*.pth.tar")))
    assert names == ["checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar"]
    ck = _ckpt(os.path.join(runs[0], "checkpoint_0001.pth.tar"))
    assert {"epoch", "arch", "state_dict", "optimizer", "scaler", "u"} <= set(ck)
    assert ck["epoch"] == 2 and ck["arch"] == "resnet18"
    u = ck["u"]
    assert tuple(u.shape) == (32, 1) and u.device.type == "cpu" and u.dtype == torch.float32
    assert (u > 0).all()  # 2 iterations x 16 = every image visited each epoch
    torch.testing.assert_close(u.flatten(), ck["state_dict"]["module.u"])
    sd = ck["state_dict"]
    assert "module.base_encoder.fc.0.weight" in sd and "module.base_encoder.fc.4.weight" not in sd
    assert all(k.startswith("module.base_encoder.") or k == "module.u" for k in sd)
    # the lr of the last iteration: 0.075·√16 = 0.3, warmup over 10 epochs, t = 1 + 1/2
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.3 * 1.5 / 10)
    net = load_backbone(os.path.join(runs[0], "checkpoint_0001.pth.tar"), "resnet18")
    assert net.loaded_prefix == "module.base_encoder."


def test_seed_linear_command(seed_run, tiny_folder, tmp_path):
    """The seed's lincls.py command through eval_linear.py (protocol inferred from its flags)."""
    if not os.path.exists(os.path.join(os.path.dirname(main_sogclr.__file__), "eval_linear.py")):
        pytest.skip("eval_linear.py not present")
    import eval_linear
    ckpt = glob.glob(os.path.join(seed_run, "*", "checkpoint_0001.pth.tar"))[0]
    eval_linear.main(["--dist-url", "tcp://localhost:10001", "--multiprocessing-distributed", "--world-size", "1",
                      "--rank", "0", "--workers", "0", "--pretrained", ckpt, "--data_name", "imagenet1000",
                      "--data", tiny_folder, "--save_dir", str(tmp_path), "-a", "resnet18", "--epochs", "1",
                      "-b", "16", "--image_size", "32"])
    out = os.path.join(str(tmp_path), "linear_eval_" + os.path.basename(os.path.dirname(ckpt)))
    import json
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["protocol"] == "sogclr" and res["global_batch"] == 16
    assert res["lr"] == pytest.approx(0.1 * 16 / 256)
    assert res["val_images"] == 16
    from tests import recompute
    head = torch.load(os.path.join(out, "checkpoint.pth.tar"), weights_only=False)["state_dict"]
    top1 = recompute.linear_top1(load_backbone(ckpt, "resnet18"), head, recompute.image_split(tiny_folder, "val"))
    assert res["last_acc1"] == pytest.approx(top1, abs=1e-4)


def test_resume_restores_u_exactly(tiny_folder, tmp_path):
    """A 3-epoch run vs the same run restarted from its epoch-1 checkpoint: the final checkpoints
    (u, weights, optimizer) are identical."""
    args = SEED.replace("--epochs=2", "--epochs=3").split() + ["--warmup-epochs", "1", "--data", tiny_folder]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    main_sogclr.main(args + ["--output_dir", a])
    os.makedirs(b)
    shutil.copy(os.path.join(a, "checkpoint_0001.pth.tar"), b)
    main_sogclr.main(args + ["--output_dir", b])  # auto-resume from checkpoint_0001
    ca, cb = _ckpt(os.path.join(a, "checkpoint_0002.pth.tar")), _ckpt(os.path.join(b, "checkpoint_0002.pth.tar"))
    c1 = _ckpt(os.path.join(a, "checkpoint_0001.pth.tar"))
    assert not torch.equal(c1["u"], ca["u"])  # u moved during epoch 2
    assert torch.equal(ca["u"], cb["u"])
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    for s, t in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert torch.equal(s["mu"], t["mu"])
    # --resume with an explicit path into an empty directory gives the same epoch 2
    c = str(tmp_path / "c")
    main_sogclr.main(args + ["--output_dir", c, "--resume", os.path.join(b, "checkpoint_0001.pth.tar")])
    cc = _ckpt(os.path.join(c, "checkpoint_0002.pth.tar"))
    assert torch.equal(ca["u"], cc["u"]) and sorted(os.listdir(c)).count("checkpoint_0002.pth.tar") == 1


def test_two_processes(tiny_folder, tmp_path, repo_root):
    """The seed command with 2 gloo processes (--nproc 2): global batch 16 = 8 per process."""
    out = str(tmp_path / "two")
    cmd = [sys.executable, "main_sogclr.py", *SEED.replace("--epochs=2", "--epochs=1").split(), "--nproc", "2",
           "--data", tiny_folder, "--output_dir", out]
    r = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "processes 2" in r.stdout and "batch 8 per process, 16 global" in r.stdout
    ck = _ckpt(os.path.join(out, "checkpoint_0000.pth.tar"))
    assert tuple(ck["u"].shape) == (32, 1) and (ck["u"] > 0).all()


def test_imagenet100_selection_and_train_list(tmp_path_factory, tmp_path, repo_root):
    from src.data.builtin import make_synthetic_folder
    root = make_synthetic_folder(str(tmp_path_factory.mktemp("in101")), num_classes=101, train_per_class=1,
                                 val_per_class=0, size=16, splits=("train",))
    seed100 = SEED.replace("--epochs=2", "--epochs=1").split() + ["--max_iters", "1", "--data_name", "imagenet100",
                                                                   "--data", root]
    main_sogclr.main(seed100 + ["--save_dir", str(tmp_path / "s")])
    run = glob.glob(str(tmp_path / "s" / "20221005_imagenet100_resnet18_sogclr-16-64_bz_16_E1_*"))
    assert len(run) == 1
    ck = _ckpt(os.path.join(run[0], "checkpoint_0000.pth.tar"))
    assert tuple(ck["u"].shape) == (100, 1) and int((ck["u"] > 0).sum()) == 16
    # a --train_list of the same subset gives the same dataset
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"train/class_{c:03d}/img_0000.png {c}\n" for c in range(100)))
    ds = main_sogclr.build_datasets(main_sogclr.get_parser().parse_args(
        ["--data", root, "--data_name", "imagenet100", "--image_size", "16"]))[0]
    ds_list = main_sogclr.build_datasets(main_sogclr.get_parser().parse_args(
        ["--data", root, "--train_list", str(lst), "--image_size", "16"]))[0]
    assert ds.samples == ds_list.samples and len(ds) == 100


def test_bad_input_is_one_line(tiny_folder, tmp_path, capsys, seed_run):
    with pytest.raises(SystemExit) as e:
        main_sogclr.main(SEED.split() + ["--data_name", "imagenet100", "--data", tiny_folder,
                                         "--output_dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than the 100" in err[0]
    with pytest.raises(SystemExit) as e:
        main_sogclr.main(SEED.split() + ["--data", str(tmp_path / "missing")])
    assert e.value.code == 2
    capsys.readouterr()


def test_resume_from_official_layout_checkpoint(tiny_folder, tmp_path, seed_run):
    """An official checkpoint keeps u (N+1 rows, N hard-coded) outside state_dict and has no RNG:
    resuming it continues exactly as resuming our own checkpoint (SogCLR draws no random numbers
    in the model; the data order and augmentation depend on (seed, epoch, index) only)."""
    ours = glob.glob(os.path.join(seed_run, "*", "checkpoint_0001.pth.tar"))[0]
    ck = _ckpt(ours)
    del ck["state_dict"]["module.u"], ck["rng"], ck["method"], ck["args"]
    ck["u"] = torch.cat([ck["u"], torch.zeros(1, 1)])  # the official N = len(dataset) + 1
    torch.save(ck, str(tmp_path / "official.pth.tar"))
    finals = []
    for name, src in (("off", str(tmp_path / "official.pth.tar")), ("ours", ours)):
        out = tmp_path / name
        main_sogclr.main(SEED.replace("--epochs=2", "--epochs=3").split() + [
            "--data", tiny_folder, "--output_dir", str(out), "--resume", src])
        finals.append(_ckpt(str(out / "checkpoint_0002.pth.tar")))
    a, b = finals
    assert a["epoch"] == b["epoch"] == 3
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    # too short a u is refused with one line
    ck["u"] = ck["u"][:5]
    torch.save(ck, str(tmp_path / "short.pth.tar"))
    with pytest.raises(SystemExit) as e:
        main_sogclr.main(SEED.replace("--epochs=2", "--epochs=3").split() + [
            "--data", tiny_folder, "--output_dir", str(tmp_path / "s"), "--resume", str(tmp_path / "short.pth.tar")])
    assert e.value.code == 2


def test_knn_monitor_follows_the_file_lists(tiny_folder, tmp_path):
    tl, vl = tmp_path / "tl.txt", tmp_path / "vl.txt"
    tl.write_text("".join(f"train/class_{c:03d}/img_000{i}.png\n" for c in range(3) for i in range(2)))
    vl.write_text("".join(f"val/class_{c:03d}/img_0000.png\n" for c in range(3)))
    base = ["--data", tiny_folder, "--train_list", str(tl), "--knn_freq", "1", "--image_size", "16"]
    ds, knn = main_sogclr.build_datasets(main_sogclr.get_parser().parse_args(base + ["--val_list", str(vl)]), 0)
    assert (len(ds), len(knn.bank), len(knn.queries), knn.num_classes) == (6, 6, 3, 3)
    assert knn.workers == 0   # the training loader's workers (-j 0: none in the monitor either)
    with pytest.raises(Exception, match="needs --val_list"):
        main_sogclr.build_datasets(main_sogclr.get_parser().parse_args(base))
