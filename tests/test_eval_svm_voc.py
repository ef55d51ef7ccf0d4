"""eval_svm_voc.py (disco_pcl_evals.md C1) on a generated VOC2007-layout folder: AP by hand, labels,
low-shot draws, full and low-shot runs, the feature cache."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from src.eval import svm_voc as V


def make_voc(root: str, n_trainval: int = 40, n_test: int = 20, with_class_files: bool = True) -> str:
    """VOCdevkit/VOC2007 with JPEGImages, Annotations (XML) and ImageSets/Main. Image i holds classes
    i % 20 and (7i + 3) % 20; every 5th image has its second object marked difficult."""
    voc = os.path.join(root, "VOCdevkit", "VOC2007")
    for d in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, d), exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {"trainval": [f"{i:06d}" for i in range(n_trainval)],
              "test": [f"{i:06d}" for i in range(n_trainval, n_trainval + n_test)]}
    labels = {}
    for split, ids in splits.items():
        for i in ids:
            n = int(i)
            objs = [(n % 20, False), ((7 * n + 3) % 20, n % 5 == 0)]
            lab = [-1] * 20
            for c, diff in objs:
                lab[c] = max(lab[c], 0 if diff else 1)
            labels[i] = lab
            colour = np.array([(n % 20) * 12, ((7 * n + 3) % 20) * 12, 128])
            img = np.clip(colour + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(voc, "JPEGImages", f"{i}.jpg"))
            xml = "".join(f"<object><name>{V.CLASSES[c]}</name><difficult>{int(d)}</difficult></object>"
                          for c, d in objs)
            with open(os.path.join(voc, "Annotations", f"{i}.xml"), "w") as f:
                f.write(f"<annotation><filename>{i}.jpg</filename>{xml}</annotation>")
        with open(os.path.join(voc, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
        if with_class_files:
            for c, name in enumerate(V.CLASSES):
                with open(os.path.join(voc, "ImageSets", "Main", f"{name}_{split}.txt"), "w") as f:
                    f.write("".join(f"{i} {labels[i][c]:2d}\n" for i in ids))
    return voc


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("voc"))
    make_voc(root)
    return root


def test_ap_hand_computed_all_points():
    # ranked: +, −, difficult(0 → negative), +, −. precision at the two positives: 1/1 and 2/4;
    # recall 0.5 then 1.0 → envelope 1.0 on [0, 0.5] and 0.5 on (0.5, 1]: AP = 0.5·1 + 0.5·0.5
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    target = np.array([1, -1, 0, 1, -1])
    assert V.voc_ap(scores, target) == pytest.approx(0.75)
    # the envelope: a later higher precision lifts earlier recall levels (not 11-point)
    assert V.voc_ap(np.array([3.0, 2, 1, 0]), np.array([-1, 1, 1, -1])) == pytest.approx(2 / 3)
    assert V.voc_ap(np.array([1.0, 0.5]), np.array([1, -1])) == 1.0


def test_labels_from_class_files_and_annotations_agree(tmp_path):
    a = make_voc(str(tmp_path / "a"), 10, 5)
    b = make_voc(str(tmp_path / "b"), 10, 5, with_class_files=False)
    for split in ("trainval", "test"):
        ids_a, ya = V.read_split(a, split)
        ids_b, yb = V.read_split(b, split)
        assert ids_a == ids_b and np.array_equal(ya, yb)
    assert (ya == 0).any() and (ya == 1).any() and (ya == -1).any()
    assert V.find_voc_root(str(tmp_path / "a")) == a


def test_low_shot_draws_are_deterministic_for_a_seed():
    rng0 = np.random.default_rng(3)
    y = np.where(rng0.random((60, 20)) < 0.2, 1, -1)
    y[rng0.random((60, 20)) < 0.05] = 0
    draws = lambda seed: [V.low_shot_indices(y, k, r) for r in [random.Random(seed)] for k in (1, 2, 4) for _ in range(5)]
    a, b = draws(0), draws(0)
    assert a == b and draws(1) != a
    assert a[0] != a[1]  # consecutive runs are consecutive draws of one stream
    for idx, k in zip(a, [1] * 5 + [2] * 5 + [4] * 5):
        per_class = [idx[c * k:(c + 1) * k] for c in range(20)]  # when every class has >= k positives
        if all((y[:, c] > 0).sum() >= k for c in range(20)):
            assert len(idx) == 20 * k
            assert all(all(y[i, c] > 0 for i in ids) and len(set(ids)) == k for c, ids in enumerate(per_class))


def _pcl_style_checkpoint(path: str) -> None:
    from src.models.backbones import build_encoder
    from src.models.heads import moco_head
    torch.manual_seed(0)
    enc = build_encoder("resnet18", moco_head(512, 128, True))
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}}, path)


def test_full_and_low_shot_runs_reuse_the_feature_cache(voc_root, tmp_path, monkeypatch, capsys):
    import eval_svm_voc as E
    ck = str(tmp_path / "pcl.pth.tar")
    _pcl_style_checkpoint(ck)
    out = str(tmp_path / "out")
    base = ["--pretrained", ck, "-a", "resnet18", "--image_size", "32", "-b", "16", "--output_dir", out]
    full = E.main(base + ["-j", "0", "--cost", "0.1,0.5", voc_root])
    assert full["feature_dim"] == 512 and full["trainval_images"] == 40 and full["test_images"] == 20
    f = full["full"]
    assert f["mAP"] == max(v["mAP"] for v in f["per_cost"].values()) and 0 < f["mAP"] <= 100
    assert len(f["per_cost"]["0.5"]["ap"]) == 20
    cache = sorted(os.listdir(os.path.join(out, "feature_cache")))
    assert len(cache) == 2
    x = np.load(os.path.join(out, "feature_cache", cache[0]))
    assert x.shape[1] == 512 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-4)

    # from now on the network must not be needed: the features come from the cache
    monkeypatch.setattr(E, "load_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    low = E.main(base + ["-j", "0", "--low-shot", voc_root])
    ls = low["low_shot"]
    assert list(ls) == ["1", "2", "4", "8", "16"]
    for k, v in ls.items():
        runs = v["per_cost"]["0.5"]["runs"]
        assert len(runs) == 5 and v["mAP"] == pytest.approx(np.mean(runs)) and v["std"] == pytest.approx(np.std(runs))
    assert E.main(base + ["-j", "0", "--low-shot", voc_root])["low_shot"] == ls  # same seed, same draws
    par = E.main(base + ["-j", "2", "--cost", "0.5", voc_root])  # 20 classes in 2 processes: same numbers
    assert par["full"]["per_cost"]["0.5"] == f["per_cost"]["0.5"]
    assert json.load(open(os.path.join(out, "results.json")))["full"]["mAP"] == par["full"]["mAP"]
    log = open(os.path.join(out, "logs", "svm_voc.log")).read()
    assert log.count("from the cache") == 6 and "k=16" in log


def test_bad_inputs_are_one_line(tmp_path, capsys):
    import eval_svm_voc as E
    for argv, msg in ((["--cost", "a,b", str(tmp_path)], "--cost must be"),
                      ([str(tmp_path)], "no VOC2007 devkit"),
                      (["--pretrained", str(tmp_path / "nope.pth"), str(tmp_path)], "checkpoint not found")):
        with pytest.raises(SystemExit) as e:
            E.main(argv + ["--output_dir", str(tmp_path / "o")])
        assert e.value.code == 2 and msg in capsys.readouterr().err
