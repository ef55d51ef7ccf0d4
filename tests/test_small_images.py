"""Small-image mode: the CIFAR and STL-10 readers on files written in the official formats, the
small-image preset's rules, the default 224 px pipelines unchanged, the kNN protocol by hand."""
from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from src.data import small
from src.data import transforms as TR
from src.data.cifar import CifarDataset
from src.data.stl10 import Stl10Dataset
from src.errors import UserError
from tests.small_data import CIFAR10_NAMES, write_cifar10, write_cifar100, write_stl10


# ----------------------------------------------------------------------------- readers
def test_cifar_readers_official_format(tmp_path):
    """Pixels (plane order R, G, B, rows within a plane), labels, names, train = the five batches in
    order, test = test_batch; the seeded (index, epoch) contract."""
    ref = write_cifar10(str(tmp_path))
    tr = small.small_split("cifar10", str(tmp_path), "pretrain")
    te = small.small_split("cifar10", str(tmp_path), "test")
    assert isinstance(tr, CifarDataset) and len(tr) == 20 and len(te) == 8
    assert tr.classes == CIFAR10_NAMES and tr.targets == ref["train"][1] and te.targets == ref["test"][1]
    for ds, (imgs, labels) in ((tr, ref["train"]), (te, ref["test"])):
        for i in (0, 7, len(ds) - 1):
            img, y, idx = ds[i]
            assert np.array_equal(np.asarray(img), imgs[i]) and y == labels[i] and idx == i
    ref100 = write_cifar100(str(tmp_path))
    c100 = small.small_split("cifar100", str(tmp_path), "train")
    assert len(c100) == 12 and c100.targets == ref100["train"][1] and c100.classes[7] == "class007"
    assert np.array_equal(np.asarray(c100[3][0]), ref100["train"][0][3])
    seeded = small.small_split("cifar10", str(tmp_path), "pretrain", TR.moco_v2_augmentation(32), seed=3)
    assert torch.equal(seeded[(4, 1)][0], seeded[(4, 1)][0]) and not torch.equal(seeded[(4, 1)][0], seeded[(4, 2)][0])


def test_stl10_reader_official_format(tmp_path):
    """Column-major planes read upright, labels 1..10 → 0..9, class_names.txt, every split, the
    pretraining split = train then unlabeled (target -1), memory-mapped files not pickled."""
    ref = write_stl10(str(tmp_path))
    tr = Stl10Dataset(str(tmp_path), "train")
    assert len(tr) == 6 and tr.targets == [v - 1 for v in ref["train"][1]]
    assert tr.classes[:3] == ["airplane", "bird", "car"]
    for i in range(6):
        img, _, idx = tr[i]
        assert img.size == (96, 96) and np.array_equal(np.asarray(img), ref["train"][0][i]) and idx == i
    te = small.small_split("stl10", str(tmp_path), "test")
    assert len(te) == 4 and np.array_equal(np.asarray(te[3][0]), ref["test"][0][3])
    pre = small.small_split("stl10", str(tmp_path), "pretrain")
    assert pre.split == "train+unlabeled" and len(pre) == 11 and pre.targets[6:] == [-1] * 5
    assert np.array_equal(np.asarray(pre[5][0]), ref["train"][0][5])        # train first ...
    assert np.array_equal(np.asarray(pre[6][0]), ref["unlabeled"][0][0])    # ... then unlabeled
    assert np.array_equal(np.asarray(pre[10][0]), ref["unlabeled"][0][4])
    state = pre.__getstate__()                  # what a spawned loader worker receives
    assert pre._maps is not None and state["_maps"] is None and len(pickle.dumps(state["_parts"])) < 1000
    clone = Stl10Dataset.__new__(Stl10Dataset)
    clone.__dict__.update(state)                # re-opens the memory maps on first use
    assert np.array_equal(np.asarray(clone[9][0]), ref["unlabeled"][0][3])
    write_stl10(str(tmp_path / "nonames"), names=False)
    assert Stl10Dataset(str(tmp_path / "nonames"), "test").classes == [str(i) for i in range(1, 11)]


def test_small_dataset_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="stl10_binary/train_X.bin is missing"):
        small.check_files("stl10", str(tmp_path))
    with pytest.raises(UserError, match="cifar-10-batches-py/data_batch_1 is missing"):
        small.check_files("cifar10", str(tmp_path))
    write_stl10(str(tmp_path))
    with open(tmp_path / "stl10_binary" / "train_X.bin", "ab") as f:
        f.write(b"\0" * 5)
    with pytest.raises(UserError, match="not a whole number"):
        Stl10Dataset(str(tmp_path), "train")
    with open(tmp_path / "stl10_binary" / "test_y.bin", "wb") as f:
        f.write(bytes([0, 1, 2, 3]))          # 0 is not a label on disk (1..10)
    with pytest.raises(UserError, match="one label in 1..10"):
        Stl10Dataset(str(tmp_path), "test")


# ----------------------------------------------------------------------------- the preset
def test_crop_scaling_rule():
    assert small.scale_crop_sizes([224, 96], 32) == [32, 14]     # 13.71 → 14
    assert small.scale_crop_sizes([224, 96], 96) == [96, 41]     # 41.14 → 41
    assert small.scale_crop_sizes([224, 112], 32) == [32, 16]
    assert small.scale_crop_sizes([32, 16], 32) == [32, 16]      # already small: kept
    assert small.scale_crop_sizes([160, 100], 32) == [32, 20]    # 20.0
    assert small.scale_crop_sizes([224, 7], 32) == [32, 1]       # never 0 px


def _parsed(script: str, argv: list[str]):
    import importlib

    from src import sanity
    return sanity.parse_args(importlib.import_module(script).get_parser, argv)


def test_preset_fills_what_the_command_line_does_not_give(tmp_path, tiny_folder):
    write_cifar10(str(tmp_path))
    write_cifar100(str(tmp_path))
    write_stl10(str(tmp_path))
    root = str(tmp_path)
    a = _parsed("main_moco", [root, "--dataset", "cifar10", "-a", "resnet18", "--aug-plus"])
    p = small.apply_presets(a, root)
    assert a.image_size == 32 and a.cifar_stem and p["blur"] is False and p["min_scale"] == 0.08
    kw = small.aug_kwargs(a)
    assert kw == {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616), "blur": False, "min_scale": 0.08}
    assert "small-image preset (cifar10, 32 px images): crops 32 px" in small.describe(a)

    a = _parsed("main_moco", [root, "--dataset", "stl10", "-a", "efficientb0", "--image_size", "64"])
    p = small.apply_presets(a, root)
    assert a.image_size == 64 and not a.cifar_stem and p["blur"] is True and p["side"] == 96   # given size wins
    assert p["std"] == [0.247, 0.243, 0.261] and "no CIFAR stem (efficientb0" in small.describe(a)

    a = _parsed("main_swav", ["--data_path", root, "--dataset", "cifar100", "--size_crops", "224", "96", "--nmb_crops",
                              "2", "6", "--min_scale_crops", "0.14", "0.05", "--max_scale_crops", "1", "0.14"])
    small.apply_presets(a, root)
    assert a.size_crops == [32, 14] and a.min_scale_crops == [0.14, 0.05]    # explicit scales kept
    assert small.preset_of(a)["mean"] == [0.5071, 0.4865, 0.4409] and "multi-crop 32/14 px" in small.describe(a)
    a = _parsed("main_moco_m", ["--data_path", root, "--dataset", "stl10"])
    small.apply_presets(a, root)
    assert a.size_crops == [96] and a.min_scale_crops == [0.08]              # default scale → solo-learn's 0.08

    a = _parsed("main_sogclr", ["--data", root, "--dataset", "cifar10", "--crop-min", "0.2"])
    small.apply_presets(a, root)
    assert a.crop_min == 0.2
    assert small.aug_kwargs(a, min_scale=False) == {k: v for k, v in kw.items() if k != "min_scale"}
    a = _parsed("main_caco", ["--data", root, "--dataset", "CIFAR10"])   # CaCo's own --dataset (any case)
    small.apply_presets(a, root)
    assert small.dataset_name(a) == "cifar10" and a.image_size == 32
    a = _parsed("main_caco", ["--data", root])                          # official default "ImageNet": a folder
    assert small.apply_presets(a, root) is None and small.aug_kwargs(a) == {}

    a = _parsed("main_moco", [tiny_folder, "-a", "resnet18"])
    assert small.apply_presets(a, tiny_folder, os.path.join(tiny_folder, "train")) is None and a.image_size == 224
    assert "no small-image preset" in small.describe(a)
    a = _parsed("main_moco", [tiny_folder, "-a", "resnet18", "--small_images"])
    p = small.apply_presets(a, tiny_folder, os.path.join(tiny_folder, "train"))
    assert a.image_size == 32 and p["side"] == 32 and p["mean"] == [0.4914, 0.4822, 0.4465]   # measured on disk
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="cifar-100-python/train is missing"):
        small.apply_presets(_parsed("main_moco", ["x", "--dataset", "cifar100"]), str(tmp_path / "empty"))


def test_transforms_under_the_preset():
    """No blur at 32 px, RRC (0.08, 1), the dataset's mean/std; the eval transform keeps a 32 px
    image whole (only ToTensor + Normalize)."""
    kw = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616), "blur": False, "min_scale": 0.08}
    for make in (TR.moco_v2_augmentation, TR.moco_v1_augmentation):
        ops = make(32, **kw).transforms
        assert ops[0].scale == (0.08, 1.0) and ops[0].size == (32, 32)
        assert not any(isinstance(getattr(o, "transforms", [None])[0], TR.GaussianBlur) for o in ops)
        assert tuple(ops[-1].mean) == kw["mean"] and tuple(ops[-1].std) == kw["std"]
    sog = TR.sogclr_augmentation(32, 0.08, kw["mean"], kw["std"], False)
    assert not any(isinstance(o, TR.GaussianBlur) for o in sog.transforms)
    _, v2 = TR.caco_augmentations(32, **kw)
    assert [type(o).__name__ for o in v2.transforms[:5]] == ["RandomResizedCrop", "RandomApply", "RandomGrayscale",
                                                            "RandomApply", "RandomHorizontalFlip"]   # solarize stays
    mc = TR.MultiCropTransform([32, 14], [2, 2], [0.08, 0.05], [1, 0.14], blur_p=0.0, mean=kw["mean"], std=kw["std"])
    assert not any(isinstance(o, TR.PILRandomGaussianBlur) for t in mc.trans for o in t.transforms)
    assert [t.transforms[0].size for t in mc.trans] == [(32, 32)] * 2 + [(14, 14)] * 2
    cm = TR.caco_multicrop([32, 14], [1, 1], [0.08, 0.05], [1, 0.14], init_size=32, init_min_scale=0.08,
                           mean=kw["mean"], std=kw["std"], blur=False)
    assert cm.trans[0].transforms[0].scale == (0.08, 1.0) and len(cm.trans) == 3
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    a = _parsed("main_moco", ["x", "--dataset", "cifar10"])
    a.small_preset, a.image_size = {"mean": list(kw["mean"]), "std": list(kw["std"])}, 32
    whole = T.Compose([T.ToTensor(), T.Normalize(kw["mean"], kw["std"])])(img)
    assert torch.equal(small.eval_tf(a)(img), whole)


# Checksums (sum, |sum|, first value) of every default 224 px pipeline on a fixed 320×256 image with the
# dataset's seeding (random, numpy, torch) for seeds 0 and 1, recorded before the small-image options
# were added: the defaults must stay bit-for-bit the official pipelines.
GOLDEN_224 = {
    "moco_v1": [[[15155.1818, 104906.1187, -0.165682]], [[66057.0158, 141069.8314, 0.896053]]],
    "moco_v2": [[[15634.3069, 56299.452, 0.485059]], [[66796.3216, 137699.9748, 2.14616]]],
    "sogclr": [[[19808.9186, 57671.9779, -1.330165]], [[62656.0015, 131596.7588, 1.718041]]],
    "caco_v1": [[[15626.3937, 56297.2491, 0.485059]], [[67078.2007, 132692.1469, 2.026286]]],
    "caco_v2": [[[15646.9579, 74469.621, 0.211063]], [[67088.0152, 133929.6372, 1.42692]]],
    "multicrop": [[[95215.6439, 104094.8195, 0.177589], [203994.1913, 206742.989, 0.555986],
                   [29402.6394, 47447.4336, 2.103973], [31415.0667, 42344.6751, -0.716804]],
                  [[40224.641, 115719.4479, 1.415979], [37842.8423, 197724.2887, 0.727984],
                   [-17523.0387, 18908.8402, 0.160389], [-2902.9515, 13921.1416, 0.349587]]],
    "caco_mc": [[[14962.5647, 74054.7168, -0.542427], [5493.4641, 117187.4337, -1.141793],
                 [-8415.6482, 23872.2948, -0.131433], [5092.7162, 19097.6838, 0.827554]],
                [[62539.2647, 136743.5938, 1.42692], [-14175.0135, 63055.3711, 0.896053],
                 [14657.7293, 20691.5039, 1.187174], [19750.4739, 26780.57, 0.108314]]],
    "eval": [[[31111.6081, 108058.6512, -0.062934]], [[31111.6081, 108058.6512, -0.062934]]],
    "linear": [[[34280.0299, 107338.6227, -0.765048]], [[30789.3845, 106441.8546, 1.255673]]],
}


def test_default_224_pipelines_unchanged():
    import random
    rs = np.random.RandomState(0)
    image = Image.fromarray(rs.randint(0, 255, (60, 80, 3)).astype(np.uint8)).resize((320, 256), Image.BILINEAR)
    pipelines = {"moco_v1": TR.moco_v1_augmentation(224), "moco_v2": TR.moco_v2_augmentation(224),
                 "sogclr": TR.sogclr_augmentation(224, 0.08), "caco_v1": TR.caco_augmentations(224)[0],
                 "caco_v2": TR.caco_augmentations(224)[1],
                 "multicrop": TR.MultiCropTransform([224, 96], [2, 2], [0.14, 0.05], [1.0, 0.14]),
                 "caco_mc": TR.caco_multicrop([224, 96], [1, 2], [0.14, 0.05], [1.0, 0.14]),
                 "eval": TR.eval_transform(224), "linear": TR.linear_train_transform(224)}
    for name, t in pipelines.items():
        for seed, want in zip((0, 1), GOLDEN_224[name]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            out = t(image)
            out = out if isinstance(out, list) else [out]
            got = [[float(x.double().sum()), float(x.double().abs().sum()), float(x[0, 0, 0])] for x in out]
            assert np.allclose(got, want, rtol=1e-6, atol=2e-3), (name, seed, got, want)


# ----------------------------------------------------------------------------- kNN protocol
def _unit(cos: float) -> list[float]:
    return [cos, math.sqrt(1 - cos * cos)]


def test_knn_protocol_hand_computed():
    """Query q = (1, 0); bank cosines 0.9 (class 0), 0.85 and 0.85 (class 1), 0.1 (class 2). Weights
    exp(s / t) at t = 0.1: e^9 = 8103.08 for class 0, 2 e^8.5 = 9829.54 for class 1, e^1 = 2.72.
    k = 1: class 0 wins; k = 3 (and lightly's k = 200, the whole bank): class 1 wins."""
    from src.eval.knn import knn_accuracy, knn_predict
    bank = torch.tensor([_unit(0.9), _unit(0.85), _unit(0.85), _unit(0.1)], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k, t = small.LIGHTLY_KNN["k"], small.LIGHTLY_KNN["t"]
    assert (k, t) == (200, 0.1)
    s1 = knn_predict(bank, labels, q, 3, k=1, T=t)
    assert torch.allclose(s1, torch.tensor([[8103.083927575384, 0.0, 0.0]], dtype=torch.float64))
    s200 = knn_predict(bank, labels, q, 3, k=k, T=t)
    want = torch.tensor([[8103.083927575384, 2 * 4914.768840299134, 2.718281828459045]], dtype=torch.float64)
    assert torch.allclose(s200, want, rtol=1e-12)
    assert knn_accuracy(bank, labels, q, torch.tensor([1]), 3, k, t)[0] == 100.0
    assert knn_accuracy(bank, labels, q, torch.tensor([1]), 3, 1, t)[0] == 0.0
    # the monitor's and eval_knn's flags: lightly's values unless given
    a = _parsed("main_moco", ["x", "--knn_protocol", "lightly"])
    small.apply_knn_protocol(a, set(a.explicit_flags))
    assert (a.knn_k, a.knn_t, a.knn_freq) == (200, 0.1, 1)
    a = _parsed("main_caco", ["--data", "x", "--knn_protocol", "lightly", "--knn_neighbor", "50", "--knn_freq", "5"])
    small.apply_knn_protocol(a, set(a.explicit_flags))
    assert (a.knn_k, a.knn_t, a.knn_freq) == (50, 0.1, 5)
    a = _parsed("main_moco_m", ["--knn_protocol", "lightly"])
    small.apply_knn_protocol(a, set(a.explicit_flags))
    assert (a.knn_k, a.knn_t, a.temperature) == (200, 0.1, 0.2)     # the loss temperature is not the kNN's
    a = _parsed("eval_knn", ["x", "--knn_protocol", "lightly"])
    small.apply_knn_protocol(a, set(a.explicit_flags))
    assert (a.nb_knn, a.temperature) == ([200], 0.1)


def test_eval_knn_stl10_bank_is_train_queries_are_test(tmp_path, capsys):
    """eval_knn.py --dataset stl10: bank = the 6 labelled train images (not the unlabeled ones),
    queries = the 4 test images, features of the preset's eval transform; numbers = a by-hand kNN."""
    import json

    import eval_knn
    from src.engine import seed_everything
    from src.models.backbones import build_backbone
    from tests.test_eval_knn import loop_knn_scores
    write_stl10(str(tmp_path))
    eval_knn.main([str(tmp_path), "--dataset", "stl10", "-a", "resnet18", "--image_size", "32", "-j", "0",
                   "--knn_protocol", "lightly", "--nb_knn", "3", "200", "--seed", "5"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (res["bank_images"], res["query_images"], res["temperature"], res["dataset"]) == (6, 4, 0.1, "stl10")
    seed_everything(5)
    net = build_backbone("resnet18", cifar_stem=True).eval()
    mean, std = small.NORMALIZATION["stl10"]
    tf = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(mean, std)])
    feats = {}
    for split in ("train", "test"):
        ds = Stl10Dataset(str(tmp_path), split, tf)
        with torch.no_grad():
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            feats[split] = (F.normalize(net(x), dim=1).double(), torch.tensor(ds.targets))
    for k in (3, 200):
        ref = loop_knn_scores(*feats["train"], feats["test"][0], 10, min(k, 6), 0.1)
        top1 = 100.0 * (ref.argmax(1) == feats["test"][1]).double().mean().item()
        assert res["knn"][str(k)]["top1"] == pytest.approx(top1), k
