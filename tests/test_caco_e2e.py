"""``main_caco.py`` end to end: the seed's single-crop and multi-crop commands (script name, data path
and sizes changed) on 2 gloo processes, exact resume from ours and from an official-layout checkpoint
(ad_init skipped), the seed's ``linear.py`` command, the kNN monitor on a set with a known answer,
and one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import main_caco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# README 1.1 (batch 1024, one node) with sizes changed, + -a resnet18 --image_size 32
SEED = ("--type=0 --lr=0.3 --lr_final=0.003 --memory_lr=3.0 --memory_lr_final=3.0 --cluster=16 --moco_t=0.08 "
        "--mem_t=0.08 --dist_url=tcp://localhost:10001 --batch_size=8 --wd=1.5e-6 --mem_wd=0 --moco_dim=8 "
        "--moco_m=0.99 --moco_m_decay=1 --mlp_dim=16 --epochs=2 --warmup_epochs=1 --nodes_num=1 --workers=0 "
        "--world_size 1 --rank=0 --mem_momentum=0.9 --ad_init=1 --knn_batch_size=16 --multi_crop=0 --knn_freq=10 "
        "-a resnet18 --image_size 32 --max_iters 2")
# README 2 (multi-crop, --nodes_num=4 on 4 nodes) as 2 "nodes' worth" of batch on one node of 2 processes
MULTI = SEED.replace("--multi_crop=0", "--multi_crop=1").replace("--nodes_num=1", "--nodes_num=2") \
    .replace("--batch_size=8", "--batch_size=16").replace("--epochs=2", "--epochs=1") + " --size_crops 32 16"


def _ckpt(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _jsonl(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _warmup_rows(out: str) -> list[dict]:
    return [r for r in _jsonl(out) if "ad_init_filled" in r]


def _two_procs(args: str, data: str, cwd: str, repo_root: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(repo_root, "main_caco.py"), *args.split(), "--data", data,
           "--multiprocessing_distributed", "1", "--nproc", "2"]
    env = {**os.environ, "PYTHONPATH": repo_root, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def single_run(tiny_folder, tmp_path_factory):
    cwd = str(tmp_path_factory.mktemp("caco_cwd"))
    r = _two_procs(SEED, tiny_folder, cwd, ROOT)
    return r, os.path.join(cwd, "train_log/ImageNet/Type_0/lr_0.3_0.003/memlr_3.0_3.0/t_0.08_memt0.08/"
                                "wd_1.5e-06_memwd0.0/mocomdecay_0.99/memgradm_0.9/hidden16_out8/batch_8/epoch_2/warm_1")


def test_seed_single_crop_two_processes(single_run):
    r, out = single_run
    assert "processes 2" in r.stdout and "effective global batch 8" in r.stdout
    assert "init_lr 0.3 x 8/256 = 0.009375" in r.stdout
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth.tar")) == ["checkpoint_best.pth.tar"]
    ck = _ckpt(os.path.join(out, "checkpoint_best.pth.tar"))
    assert {"epoch", "arch", "best_acc", "knn_acc", "state_dict", "optimizer", "Memory_Bank"} <= set(ck)
    assert ck["epoch"] == 2 and ck["arch"] == "resnet18"
    sd = ck["state_dict"]
    assert "module.encoder_q.fc.6.weight" in sd and "module.encoder_q.fc.7.weight" not in sd
    assert "module.encoder_k.fc.6.weight" in sd
    W = ck["Memory_Bank"]["W"]
    assert W.shape == (8, 16) and torch.equal(W, sd["module.W"]) and torch.equal(ck["Memory_Bank"]["v"], sd["module.v"])
    assert ck["Memory_Bank"]["v"].abs().sum() > 0
    # lr of epoch 1: cosine from init_lr (0.009375) at epoch 1 = warmup end
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.3 * 8 / 256)
    # ad_init: 16 columns at global batch 8 = 2 warm-up steps before epoch 0
    warm = _warmup_rows(out)
    assert [row["ad_init_filled"] for row in warm] == [8, 16]
    # kNN monitor at epochs 0 and 1 (every epoch <= 20), appended to knn.log
    with open(os.path.join(out, "knn.log")) as f:
        lines = f.read().splitlines()
    assert [ln.split()[0] for ln in lines] == ["0", "1"] and "KNN monitor Accuracy" in lines[0]
    assert ck["knn_acc"] == pytest.approx(float(lines[-1].split()[-1]), abs=1e-4)


def test_seed_multi_crop_two_processes(tiny_folder, tmp_path, repo_root):
    out = str(tmp_path / "multi")
    r = _two_procs(MULTI + f" --knn_freq 0 --output_dir {out}", tiny_folder, str(tmp_path), repo_root)
    # --batch_size 16 over --nodes_num 2, then over the node's 2 processes: 4 per process, 8 global
    assert "batch 4 per process, 8 global" in r.stdout and "effective global batch 8" in r.stdout
    assert "multi-crop" in r.stdout
    ck = _ckpt(os.path.join(out, "checkpoint_best.pth.tar"))
    assert ck["epoch"] == 1 and ck["Memory_Bank"]["v"].abs().sum() > 0
    assert [row["ad_init_filled"] for row in _warmup_rows(out)] == [8, 16]


def test_seed_linear_command(single_run, tiny_folder, tmp_path):
    """CaCo's linear.py command through eval_linear.py (protocol inferred from --data)."""
    import eval_linear
    ckpt = os.path.join(single_run[1], "checkpoint_best.pth.tar")
    eval_linear.main(["-a", "resnet18", "--lr", "0.025", "--batch-size", "16", "--pretrained", ckpt,
                      "--dist-url", "tcp://localhost:10001", "--multiprocessing-distributed", "--world-size", "1",
                      "--rank", "0", "--data", tiny_folder, "--epochs", "1", "--workers", "0", "--image_size", "32",
                      "--dump_path", str(tmp_path)])
    with open(os.path.join(str(tmp_path), "results.json")) as f:
        res = json.load(f)
    assert res["protocol"] == "caco" and res["lr"] == pytest.approx(0.025 * 16 / 256)


def test_resume_restores_memory_and_skips_ad_init(tiny_folder, tmp_path, monkeypatch):
    """A 2-epoch run vs the same run resumed from its epoch-0 checkpoint, ours and in the official
    layout (Memory_Bank top-level only, no rng/scaler/method): W, v and weights end identical, and
    neither resumed run repeats ad_init."""
    side = tmp_path / "side"
    policy = main_caco.checkpoint_policy
    monkeypatch.setattr(main_caco, "checkpoint_policy", lambda out: _with_copies(policy(out), str(side)))
    base = SEED.replace("--knn_freq=10", "--knn_freq=0").split() + ["--data", tiny_folder,
                                                                     "--multiprocessing_distributed", "0"]
    a = str(tmp_path / "a")
    main_caco.main(base + ["--output_dir", a])
    ck0 = _ckpt(str(side / "ep0.pth.tar"))
    official = {k: v for k, v in ck0.items() if k in ("epoch", "arch", "best_acc", "knn_acc", "optimizer", "Memory_Bank")}
    official["state_dict"] = {k: v for k, v in ck0["state_dict"].items() if k not in ("module.W", "module.v")}
    torch.save(official, str(tmp_path / "official.pth.tar"))
    final_a = _ckpt(os.path.join(a, "checkpoint_best.pth.tar"))
    for name, src in (("b", str(side / "ep0.pth.tar")), ("c", str(tmp_path / "official.pth.tar"))):
        out = str(tmp_path / name)
        main_caco.main(base + ["--output_dir", out, "--resume", src])
        fin = _ckpt(os.path.join(out, "checkpoint_best.pth.tar"))
        assert fin["epoch"] == 2 and not _warmup_rows(out)
        for k, v in final_a["state_dict"].items():
            assert torch.equal(v, fin["state_dict"][k]), (name, k)
        assert torch.equal(fin["Memory_Bank"]["W"], final_a["Memory_Bank"]["W"])
    assert not torch.equal(ck0["Memory_Bank"]["W"], final_a["Memory_Bank"]["W"])
    # auto-resume: the same command in a finished directory runs nothing and keeps the checkpoint
    main_caco.main(base + ["--output_dir", a])
    assert torch.equal(_ckpt(os.path.join(a, "checkpoint_best.pth.tar"))["Memory_Bank"]["v"], final_a["Memory_Bank"]["v"])


def _with_copies(pol, side: str):
    keep = pol.copies
    pol.copies = lambda e, n: keep(e, n) + [os.path.join(side, f"ep{e}.pth.tar")]
    return pol


def test_checkpoint_policy_names():
    pol = main_caco.checkpoint_policy("/r")
    assert pol.filename(0) == pol.filename(9) == "checkpoint_best.pth.tar"
    assert pol.copies(8, 200) == [] and pol.copies(9, 200) == ["/r/checkpoint_0009.pth.tar"]
    assert pol.copies(199, 200) == ["/r/checkpoint_0199.pth.tar"]


def _colour_folder(root: str, colours: dict[str, tuple[int, int, int]], n: int) -> None:
    for c, rgb in colours.items():
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.new("RGB", (32, 32), rgb).save(os.path.join(root, c, f"img_{i:02d}.png"))


def test_knn_monitor_known_answer(tmp_path):
    """Solid-colour classes: a query's own colour is in the bank with cosine 1, so every query is
    right (100 %); with the val colours rotated by one class every query is wrong (0 %). The bank is
    the first 20 % of every train class."""
    colours = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255), "d": (255, 255, 0)}
    root = tmp_path / "data"
    _colour_folder(str(root / "train"), colours, 10)
    _colour_folder(str(root / "val"), colours, 3)
    rot = dict(zip(colours, list(colours.values())[1:] + list(colours.values())[:1]))
    _colour_folder(str(tmp_path / "rot" / "train"), colours, 10)
    _colour_folder(str(tmp_path / "rot" / "val"), rot, 3)
    args = main_caco.get_parser().parse_args(["--data", str(root), "--image_size", "32", "--knn_freq", "10"])
    torch.manual_seed(0)
    from src.methods.caco import CaCo
    method = CaCo("resnet18", dim=8, mlp_dim=16, K=8)
    for data, expected in ((str(root), 100.0), (str(tmp_path / "rot"), 0.0)):
        knn = main_caco.build_knn(args, data, method, str(tmp_path), workers=0, batch_size=8,
                                  info=main_caco.D.DistInfo())
        assert [os.path.basename(p) for p, _ in knn.bank.samples] == ["img_00.png", "img_01.png"] * 4
        assert len(knn.queries) == 12
        top1, _ = knn.run(method, torch.device("cpu"))
        assert top1 == pytest.approx(expected)
    assert knn.schedule(0) and knn.schedule(20) and not knn.schedule(21) and knn.schedule(30)


def test_collapse_guard_warns_or_stops(tmp_path, caplog):
    from src.errors import UserError
    m = main_caco.CaCo("resnet18", dim=8, mlp_dim=16, K=8)
    info = main_caco.D.DistInfo()
    main_caco.collapse_guard(m, str(tmp_path), info, stop=False)(25, 0.5)
    assert "collapsed" in caplog.text and m.knn_acc == 0.5
    main_caco.collapse_guard(m, str(tmp_path), info, stop=True)(19, 0.5)  # before epoch 20: nothing
    with pytest.raises(UserError, match="collapsed"):
        main_caco.collapse_guard(m, str(tmp_path), info, stop=True)(20, 1.0)
    assert (tmp_path / "knn.log").read_text().splitlines()[0] == "25 epoch KNN monitor Accuracy 0.500000"


@pytest.mark.parametrize("extra,msg", [
    (["--cluster", "40"], "fills the --cluster 40 memory columns"),
    (["--multi_crop", "1", "--size_crops", "32"], "must have the same length"),
    (["--batch_size", "8", "--nodes_num", "3"], "not divisible by --nodes_num"),
])
def test_bad_input_is_one_line(tiny_folder, tmp_path, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        main_caco.main(SEED.split() + ["--data", tiny_folder, "--output_dir", str(tmp_path),
                                       "--multiprocessing_distributed", "0"] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
