"""Weighted kNN: knn_predict against a loop reference; eval_knn.py end to end, 1 vs 2 processes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import torch
import torch.nn.functional as F

from src.distributed import free_port
from tests.conftest import ROOT

import eval_knn  # noqa: E402
from src.eval.knn import knn_accuracy, knn_predict


def loop_knn_scores(bank, bank_labels, queries, num_classes, k, T):
    """Obviously-correct reference: for each query, sort all bank items by cosine similarity and let the
    k most similar vote exp(s/T) for their class."""
    out = []
    for q in queries.tolist():
        sims = [(sum(a * b for a, b in zip(q, x)), int(y)) for x, y in zip(bank.tolist(), bank_labels.tolist())]
        sims.sort(key=lambda t: -t[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp(s / T)
        out.append(votes)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k,T", [(1, 0.2), (5, 0.07), (20, 0.5), (100, 0.2)])
def test_knn_predict_matches_loop(k, T):
    g = torch.Generator().manual_seed(k)
    bank = F.normalize(torch.randn(60, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 5, (60,), generator=g)
    q = F.normalize(torch.randn(13, 8, generator=g, dtype=torch.float64), dim=1)
    got = knn_predict(bank, labels, q, 5, k=k, T=T, chunk=4)
    ref = loop_knn_scores(bank, labels, q, 5, min(k, 60), T)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    qy = torch.randint(0, 5, (13,), generator=g)
    top1, top5 = knn_accuracy(bank, labels, q, qy, 5, k, T)
    assert top1 == pytest.approx(100.0 * (ref.argmax(1) == qy).double().mean().item())
    assert top5 == 100.0


def test_knn_hand_made_features():
    # two tight clusters; the query near cluster 1 is class 1 for k=3, the far class-0 point loses on weight
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    q = F.normalize(torch.tensor([[0.05, 1.0], [1.0, 0.05]]), dim=1)
    scores = knn_predict(bank, labels, q, 2, k=3, T=0.1)
    assert scores.argmax(1).tolist() == [1, 0]
    assert torch.allclose(scores, loop_knn_scores(bank, labels, q, 2, 3, 0.1).float(), rtol=1e-5)


@pytest.fixture(scope="module")
def moco_ckpt(tmp_path_factory):
    from tests.test_eval_linear import make_moco_checkpoint
    return make_moco_checkpoint(str(tmp_path_factory.mktemp("pretrain_knn")))


def _args(data, ckpt, out):
    return [data, "-a", "resnet18", "--pretrained", ckpt, "--nb_knn", "1", "3", "20", "--temperature", "0.1",
            "-j", "0", "--image_size", "32", "-b", "5", "--dump_path", out]


@pytest.mark.slow
def test_eval_knn_end_to_end_and_two_processes(tiny_folder, moco_ckpt, tmp_path, capsys):
    path, _ = moco_ckpt
    one = str(tmp_path / "one")
    eval_knn.main(_args(tiny_folder, path, one))
    printed = capsys.readouterr().out
    assert "20-NN classifier result: Top1:" in printed
    r1 = json.load(open(os.path.join(one, "knn_results.json")))
    assert r1["bank_images"] == 32 and r1["query_images"] == 16 and set(r1["knn"]) == {"1", "3", "20"}

    # the same numbers from features extracted here and the loop reference
    from src.checkpoint import load_backbone
    from src.data.datasets import ImageDataset
    from src.data.transforms import eval_transform
    net = load_backbone(path, "resnet18").eval()
    tf = eval_transform(32)
    feats = {}
    for split in ("train", "val"):
        ds = ImageDataset(os.path.join(tiny_folder, split), tf)
        with torch.no_grad():
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            feats[split] = (F.normalize(net(x), dim=1).double(), torch.tensor(ds.targets))
    for k in (1, 3, 20):
        ref = loop_knn_scores(*feats["train"], feats["val"][0], 4, k, 0.1)
        top1 = 100.0 * (ref.argmax(1) == feats["val"][1]).double().mean().item()
        assert r1["knn"][str(k)]["top1"] == pytest.approx(top1), k
        assert r1["knn"][str(k)]["top5"] == 100.0  # 4 classes

    two = str(tmp_path / "two")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "eval_knn.py", *_args(tiny_folder, path, two)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    r2 = json.load(open(os.path.join(two, "knn_results.json")))
    assert r2["knn"] == r1["knn"]


def test_eval_knn_bad_input_one_line(tiny_folder, capsys):
    for argv in ([tiny_folder, "-a", "resnet18", "--pretrained", "/nonexistent.pth"],
                 [tiny_folder, "-a", "nope"], ["/nonexistent_dir"]):
        with pytest.raises(SystemExit) as e:
            eval_knn.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:")


def test_nb_knn_list_before_positional_dir_and_seeded_random_backbone(tiny_folder, capsys):
    """``--nb_knn 3 5 DIR`` (DINO-style list, then the data directory) parses; a random backbone is
    seeded, so two runs print the same numbers."""
    import eval_knn
    outs = []
    for _ in range(2):
        eval_knn.main(["-a", "resnet18", "--image_size", "32", "-j", "0", "--nb_knn", "3", "5", tiny_folder])
        outs.append([line for line in capsys.readouterr().out.splitlines() if "NN classifier" in line])
    assert len(outs[0]) == 2 and outs[0] == outs[1]
    assert outs[0][0].startswith("3-NN") and outs[0][1].startswith("5-NN")


def _sharded_knn_rank(rank, world_size, bank, labels, q, k):
    from src.eval.knn import knn_predict as kp
    shard = slice(rank, None, world_size)  # uneven shards: 11 images over 2 ranks
    return kp(bank[shard], labels[shard], q, 5, k=k, T=0.1, chunk=3, sharded=True)


@pytest.mark.parametrize("k", [3, 7])
def test_sharded_bank_equals_single_process(k):
    """Each rank holds every second bank image; k = 7 exceeds one shard (5 or 6 images)."""
    from tests.dist_utils import run_distributed
    g = torch.Generator().manual_seed(3)
    bank = torch.nn.functional.normalize(torch.randn(11, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (11,), generator=g)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    single = knn_predict(bank, labels, q, 5, k=k, T=0.1)
    outs = run_distributed(_sharded_knn_rank, 2, bank, labels, q, k)
    for o in outs:
        assert torch.allclose(o, single, atol=1e-6)
