"""DisCo's evaluation data (disco_pcl_evals.md C3, C4): the 1 %/10 % fraction builder on a SimCLR-style
split file, and the CIFAR-10/100 reader on files in torchvision's python format."""
from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

from src.data.datasets import ImageDataset
from src.errors import UserError
from src.eval.linear_data import CifarDataset, cifar_transforms, imagenet_datasets
from src.eval.linear_presets import resolve_recipe

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import make_imagenet_fraction as mif  # noqa: E402

WNIDS = ["n01440764", "n01443537", "n04235860"]


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory) -> str:
    """ImageNet layout: train/<wnid>/<wnid>_<n>.JPEG (4 per class) and val/<wnid>/ILSVRC2012_val_*.JPEG."""
    root = str(tmp_path_factory.mktemp("imagenet"))
    rng = np.random.default_rng(0)
    v = 0
    for w in WNIDS:
        for split, names in (("train", [f"{w}_{n}.JPEG" for n in (10, 11, 12, 13)]),
                             ("val", [f"ILSVRC2012_val_{(v := v + 1):08d}.JPEG" for _ in range(2)])):
            os.makedirs(os.path.join(root, split, w), exist_ok=True)
            for name in names:
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    os.path.join(root, split, w, name), format="JPEG")
    return root


def test_fraction_builder_keeps_the_first_line(fake_imagenet, tmp_path):
    # SimCLR's files start with n04235860_14959.JPEG and have no header; the official builder drops line 1
    lines = ["n04235860_12.JPEG", "n01440764_10.JPEG", "n01440764_13.JPEG", "", "n01443537_11.JPEG"]
    split = tmp_path / "1percent.txt"
    split.write_text("\n".join(lines) + "\n")
    dst = str(tmp_path / "imagenet_1_fraction")
    counts = mif.main(["--src", fake_imagenet, "--dst", dst, "--ratio", "1", "--split_dir", str(tmp_path)])
    assert counts == {"train": 4, "val": 6}
    got = sorted(os.path.join(c, f) for c in os.listdir(os.path.join(dst, "train"))
                 for f in os.listdir(os.path.join(dst, "train", c)))
    assert got == sorted(f"{ln.split('_')[0]}/{ln}" for ln in lines if ln)
    assert os.path.islink(os.path.join(dst, "train", "n04235860", "n04235860_12.JPEG"))
    assert sorted(os.listdir(os.path.join(dst, "val"))) == WNIDS
    # the folder and the split file given to eval_linear.py --train_list select the same images
    folder = ImageDataset(os.path.join(dst, "train"))
    tr, va = imagenet_datasets(fake_imagenet, 8, (0.229, 0.224, 0.225), str(split))
    assert [os.path.basename(p) for p, _ in folder.samples] == [os.path.basename(p) for p, _ in tr.samples]
    assert folder.targets == tr.targets and len(va) == 6
    # --copy makes real files, as the official script
    dst2 = str(tmp_path / "copied")
    mif.main(["--src", fake_imagenet, "--dst", dst2, "--split_file", str(split), "--copy", "--no_val"])
    assert not os.path.islink(os.path.join(dst2, "train", "n01440764", "n01440764_10.JPEG"))
    assert not os.path.exists(os.path.join(dst2, "val"))


def test_fraction_builder_errors(fake_imagenet, tmp_path):
    with pytest.raises(SystemExit) as e:
        mif.main(["--src", fake_imagenet, "--dst", str(tmp_path / "o"), "--split_file", str(tmp_path / "none.txt")])
    assert e.value.code == 2
    bad = tmp_path / "bad.txt"
    bad.write_text("filename\nn01440764_10.JPEG\n")
    with pytest.raises(UserError, match=r"line 1 \('filename'\)"):
        mif.read_split(str(bad))
    missing = tmp_path / "missing.txt"
    missing.write_text("n01440764_99.JPEG\nn01440764_10.JPEG\n")
    with pytest.raises(SystemExit):
        mif.main(["--src", fake_imagenet, "--dst", str(tmp_path / "o2"), "--split_file", str(missing)])


def test_disco_semi_protocol_recipe():
    import eval_linear
    args = eval_linear.get_parser().parse_args(["x", "--protocol", "disco_semi", "--learning-rate", "3.0", "-b", "256"])
    r = resolve_recipe(args, "disco_semi")
    assert (r.lr, r.milestones, r.gamma, r.epochs, r.wd) == (3.0, [60, 80], 0.5, 100, 0.0)


def _write_cifar100(root: str, n_train=6, n_test=4) -> np.ndarray:
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (n_train, 3072), dtype=np.uint8)
    for name, x, n in (("train", data, n_train), ("test", data[:n_test], n_test)):
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"filenames": [f"f{i}.png".encode() for i in range(n)], b"batch_label": b"x",
                         b"fine_labels": [(7 * i) % 100 for i in range(n)], b"coarse_labels": [i % 20 for i in range(n)],
                         b"data": x}, f)
    with open(os.path.join(d, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, f)
    return data


def test_cifar100_reader_official_format_and_c4_transforms(tmp_path):
    data = _write_cifar100(str(tmp_path))
    ds = CifarDataset(str(tmp_path), "cifar100", True)
    assert len(ds) == 6 and len(ds.classes) == 100 and ds.classes[7] == "fine7"
    assert ds.targets == [0, 7, 14, 21, 28, 35]  # fine labels, not coarse
    img, y = ds._load(2)
    # rows are the R, G and B planes of 32×32 (row-major), as torchvision's CIFAR100 reads them
    want = data[2].reshape(3, 32, 32).transpose(1, 2, 0)
    assert y == 14 and np.array_equal(np.asarray(img), want)
    assert len(CifarDataset(str(tmp_path), "cifar100", False)) == 4
    import torchvision.transforms as T
    train_tf, test_tf = cifar_transforms(224, (0.229, 0.224, 0.225))
    assert train_tf.transforms[0].interpolation == T.InterpolationMode.BICUBIC and train_tf.transforms[0].size == (224, 224)
    assert test_tf.transforms[0].interpolation == T.InterpolationMode.BICUBIC
    assert test_tf(img).shape == (3, 224, 224)
    with pytest.raises(UserError, match="cifar10 not found"):
        CifarDataset(str(tmp_path), "cifar10", True)
