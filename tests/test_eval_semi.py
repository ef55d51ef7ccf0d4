"""eval_semi.py: the labelled subset (SimCLR split file, MoPro's seeded fraction, class-balanced),
fine-tuning of the whole network (weights and BN statistics move, reported top-1/top-5 recomputed from
the saved network), exact resume after a stop signal, flag errors, and a 2-process torchrun run."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
import torchvision.models as tvm
from PIL import Image

import eval_semi
from src.data.datasets import ImageDataset
from src.data.transforms import eval_transform
from src.distributed import free_port
from src.engine import TrainStep
from src.errors import UserError
from src.eval.linear_data import restrict_classes
from src.eval.semi import random_fraction
from tests.conftest import ROOT

WNIDS = [f"n{1440764 + 17 * c:08d}" for c in range(4)]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def simclr_folder(tmp_path_factory) -> str:
    """The shapes of ``tiny_folder`` (4 classes × 8 train / 4 val, 32 px) under ImageNet names:
    ``train/<wnid>/<wnid>_<n>.JPEG``, so that SimCLR split lines find them."""
    from src.data.builtin import make_synthetic_folder
    src = make_synthetic_folder(str(tmp_path_factory.mktemp("shapes")), num_classes=4, train_per_class=8,
                                val_per_class=4, size=32, seed=0)
    out = str(tmp_path_factory.mktemp("imagenet_like"))
    for split in ("train", "val"):
        for c, wnid in enumerate(WNIDS):
            os.makedirs(os.path.join(out, split, wnid))
            for i, f in enumerate(sorted(os.listdir(os.path.join(src, split, f"class_{c:03d}")))):
                img = Image.open(os.path.join(src, split, f"class_{c:03d}", f)).convert("RGB")
                img.save(os.path.join(out, split, wnid, f"{wnid}_{100 + i}.JPEG"), format="JPEG", quality=95)
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[str, dict]:
    """A MoCo v2 pretraining checkpoint of this repository (DDP layout ``module.encoder_q.``, ImageNet
    stem) and the backbone part of its encoder."""
    from src.methods.moco import MoCo
    torch.manual_seed(0)
    m = MoCo("resnet18", K=64, mlp=True)
    bns = [x for x in m.encoder_q.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    for bn in bns:  # BN statistics of real activations, as a trained network has (cumulative average)
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        m.encoder_q.train()(torch.randn(32, 3, 32, 32))
    for bn in bns:
        bn.momentum = 0.1
    d = str(tmp_path_factory.mktemp("pretrain"))
    path = os.path.join(d, "checkpoint_0001.pth.tar")
    torch.save({"epoch": 1, "arch": "resnet18", "optimizer": {},
                "state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, path)
    enc = {k[len("encoder_q."):]: v.clone() for k, v in m.state_dict().items()
           if k.startswith("encoder_q.") and not k.startswith("encoder_q.fc.")}
    return path, enc


def common(data: str, ckpt: str, out: str, *extra: str) -> list[str]:
    return [data, "-a", "resnet18", "--pretrained", ckpt, "--dump_path", out, "-j", "0", "--image_size", "32",
            "-p", "100", *extra]


def results(out: str, name: str = "results.json") -> dict:
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def lines(path: str) -> list[str]:
    with open(path) as f:
        return [x for x in f.read().splitlines() if x.strip()]


def checkpoint(out: str) -> dict:
    return torch.load(os.path.join(out, "checkpoint.pth.tar"), weights_only=False)


@torch.no_grad()
def recompute_val(state_dict: dict, classes: list[str], data: str) -> tuple[float, float, float]:
    """Top-1 / top-5 (%) and mean cross-entropy of the saved network loaded into a plain torchvision
    ResNet-18, one image at a time."""
    net = tvm.resnet18(num_classes=len(classes))
    net.load_state_dict(state_dict)  # strict: the checkpoint is a plain torchvision classifier
    net.eval()
    val = restrict_classes(ImageDataset(os.path.join(data, "val"), eval_transform(32)), classes)
    c1 = c5 = loss = 0.0
    for i in range(len(val)):
        x, y, _ = val[i]
        logits = net(x.unsqueeze(0))[0]
        top = logits.topk(min(5, len(classes))).indices.tolist()
        c1, c5 = c1 + (top[0] == y), c5 + (y in top)
        loss += float(torch.logsumexp(logits.double(), 0) - logits[y].double())
    return 100.0 * c1 / len(val), 100.0 * c5 / len(val), loss / len(val)


# ----------------------------------------------------------------------------- subsets
def test_random_fraction_is_moPros_draw_and_class_balanced():
    samples = sorted((f"c{t}/img_{i:03d}.JPEG", t) for t in range(5) for i in range(10 + 7 * t))  # 120 images
    # MoPro finetune_imagenet.py: random.seed(seed); random.shuffle(samples); samples[:int(f·N)]
    random.seed(3)
    ref = list(samples)
    random.shuffle(ref)
    assert random_fraction(samples, 0.1, 3) == sorted(ref[:12])
    assert random_fraction(samples, 0.1, 4) != random_fraction(samples, 0.1, 3)
    assert random_fraction(samples, 1.0, 0) == samples
    bal = random_fraction(samples, 0.1, 3, class_balanced=True)
    counts = {t: sum(1 for _, y in bal if y == t) for t in range(5)}
    assert counts == {t: max(1, int(0.1 * (10 + 7 * t))) for t in range(5)} == {0: 1, 1: 1, 2: 2, 3: 3, 4: 3}
    assert len(set(bal)) == len(bal) and set(bal) <= set(samples)
    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match="--fraction"):
            random_fraction(samples, bad, 0)
    with pytest.raises(UserError, match="keeps none"):
        random_fraction(samples, 0.005, 0)
    assert len(random_fraction(samples, 0.005, 0, class_balanced=True)) == 5  # one per class


# ----------------------------------------------------------------------------- end to end
def test_simclr_split_file_fine_tunes_the_whole_network(simclr_folder, pretrained, tmp_path):
    """A SimCLR split file: every line (the first too: no pandas header) and nothing else is trained
    on; the backbone weights and BN statistics change; the reported top-1/top-5 are those of the saved
    network; --evaluate on the checkpoint reports the same."""
    path, enc = pretrained
    chosen = [(WNIDS[c], f"{WNIDS[c]}_{100 + i}.JPEG") for c, i in ((0, 0), (0, 5), (1, 2), (2, 7), (2, 1))]
    lst = tmp_path / "1percent.txt"
    lst.write_text("".join(f"{name}\n" for _, name in chosen) + "\n")
    out = str(tmp_path / "semi")
    eval_semi.main(common(simclr_folder, path, out, "--train_list", str(lst), "--epochs", "2", "-b", "5",
                          "--lr", "0.01"))
    res = results(out)
    assert res["train_images"] == 5 and res["train_classes"] == 3 and res["val_images"] == 12
    used = lines(os.path.join(out, "train_subset.txt"))
    assert sorted(used) == sorted(f"{w}/{n}" for w, n in chosen)

    ck = checkpoint(out)
    sd = ck["state_dict"]
    assert ck["kind"] == "finetune" and ck["epoch"] == 2 and ck["classes"] == WNIDS[:3]
    assert tuple(sd["fc.weight"].shape) == (3, 512)
    moved = [k for k in enc if not torch.equal(sd[k], enc[k])]
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight", "bn1.running_mean",
            "layer4.1.bn2.weight"} <= set(moved)  # the whole network trained, BN in train mode
    num = sum(float((sd[k].double() - enc[k].double()).pow(2).sum()) for k in enc if k.split(".")[-1] in
              ("weight", "bias") and "running" not in k)
    den = sum(float(enc[k].double().pow(2).sum()) for k in enc if k.split(".")[-1] in ("weight", "bias"))
    assert res["backbone_rel_change"] == pytest.approx((num / den) ** 0.5, rel=1e-5) and res["backbone_rel_change"] > 0

    top1, top5, loss = recompute_val(sd, WNIDS[:3], simclr_folder)
    assert res["last_acc1"] == pytest.approx(top1, abs=1e-6) and res["last_acc5"] == pytest.approx(top5, abs=1e-6)
    assert res["last_val_loss"] == pytest.approx(loss, rel=1e-4)
    assert top5 == 100.0  # 3 classes: top-5 covers them all
    log = [json.loads(x) for x in lines(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in log] == [0, 1] and res["best_acc1"] == max(r["val_acc1"] for r in log)

    ev = str(tmp_path / "eval")
    eval_semi.main(common(simclr_folder, path, ev, "--train_list", str(lst), "--evaluate", "--resume",
                          os.path.join(out, "checkpoint.pth.tar")))
    assert results(ev, "eval_results.json")["eval_acc1"] == res["last_acc1"]


def test_fraction_run_resumes_bit_identically_after_a_stop(simclr_folder, pretrained, tmp_path, monkeypatch, capsys):
    """--fraction with a seed: the subset is MoPro's draw; SIGUSR1 mid-epoch writes the checkpoint at
    its iteration and the same command then ends with exactly the network of an uninterrupted run.
    Resuming with another subset is refused with one line."""
    path, _ = pretrained
    args = ["--fraction", "0.75", "--fraction_seed", "5", "--epochs", "2", "-b", "2", "--lr", "0.01"]  # 12 it/epoch
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    eval_semi.main(common(simclr_folder, path, ref, *args))

    class Firing(TrainStep):
        calls = 0

        def __call__(self, *a, **k):
            Firing.calls += 1
            if Firing.calls == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().__call__(*a, **k)
    monkeypatch.setattr(eval_semi, "TrainStep", Firing)
    eval_semi.main(common(simclr_folder, path, run, *args))
    ck = checkpoint(run)
    assert (ck["epoch"], ck["iter"]) == (0, 10) and not os.path.exists(os.path.join(run, "results.json"))
    monkeypatch.setattr(eval_semi, "TrainStep", TrainStep)

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # another draw than the checkpoint's
        eval_semi.main(common(simclr_folder, path, run, *args[:3], "6", *args[4:]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "another training subset" in err[0], err

    eval_semi.main(common(simclr_folder, path, run, *args))
    a, b = checkpoint(ref), checkpoint(run)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    ma = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    mb = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(ma) == len(mb) == 62 and all(torch.equal(x, y) for x, y in zip(ma, mb))
    ra, rb = results(ref), results(run)
    assert rb["resumed_from_epoch"] == 0 and (ra["last_acc1"], ra["last_acc5"]) == (rb["last_acc1"], rb["last_acc5"])

    train = ImageDataset(os.path.join(simclr_folder, "train"))
    want = [os.path.relpath(p, train.root) for p, _ in random_fraction(train.samples, 0.75, 5)]
    assert lines(os.path.join(ref, "train_subset.txt")) == want and ra["train_images"] == 24
    assert ra["train_classes"] == 4 and ra["val_images"] == 16  # every class kept, as MoPro's ImageFolder


@pytest.mark.parametrize("extra, words", [
    (["--train_list", "x.txt", "--fraction", "0.1"], "give one of them"),
    (["--class_balanced"], "needs --fraction"),
    (["--fraction", "10"], "(0, 1]"),  # a percentage instead of a fraction
    (["--evaluate"], "--evaluate needs"),
    (["--resume", "missing.pth"], "not found"),
])
def test_bad_flags_give_one_line(simclr_folder, pretrained, tmp_path, capsys, extra, words):
    with pytest.raises(SystemExit) as e:
        eval_semi.main(common(simclr_folder, pretrained[0], str(tmp_path / "o"), *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and words in err[0], err


def test_refuses_the_pretraining_directory(simclr_folder, pretrained, capsys):
    with pytest.raises(SystemExit) as e:
        eval_semi.main(common(simclr_folder, pretrained[0], os.path.dirname(pretrained[0])))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--pretrained" in err[0]
    assert os.listdir(os.path.dirname(pretrained[0])) == ["checkpoint_0001.pth.tar"]


@pytest.mark.slow
def test_torchrun_two_processes(simclr_folder, pretrained, tmp_path):
    """torchrun, 2 gloo processes, -b 4 per node = 2 per process, DDP over the whole network: the saved
    network's recomputed top-1/top-5/loss are the reported (sharded, summed) ones."""
    out = str(tmp_path / "two")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "eval_semi.py",
                        *common(simclr_folder, pretrained[0], out, "--fraction", "0.5", "--class_balanced",
                                "--epochs", "1", "-b", "4", "--max_iters", "2", "--val_batch_size", "3")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "processes 2" in p.stdout and "batch 2/process 4 global" in p.stdout, p.stdout[-2000:]
    res = results(out)
    assert res["train_images"] == 16 and res["val_images"] == 16 and res["global_batch"] == 4
    ck = checkpoint(out)
    assert ck["world_size"] == 2
    top1, top5, loss = recompute_val(ck["state_dict"], WNIDS, simclr_folder)
    assert res["last_acc1"] == pytest.approx(top1, abs=1e-6) and res["last_acc5"] == pytest.approx(top5, abs=1e-6)
    # both processes validated with rank 0's BN statistics, those of the saved network
    assert res["last_val_loss"] == pytest.approx(loss, rel=1e-4)
