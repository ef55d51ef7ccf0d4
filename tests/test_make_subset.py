"""``scripts/make_imagenet_subset.py`` on a generated 120-class folder."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from src.data.builtin import make_synthetic_folder
from src.data.datasets import ImageDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import make_imagenet_subset as mis  # noqa: E402


@pytest.fixture(scope="module")
def in120(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("in120"))
    make_synthetic_folder(root, num_classes=120, train_per_class=2, val_per_class=1, size=8)
    # ImageNet-like names, whose sorted order differs from creation order
    for split in ("train", "val"):
        for c in sorted(os.listdir(os.path.join(root, split))):
            k = int(c.split("_")[1])
            os.rename(os.path.join(root, split, c), os.path.join(root, split, f"n{(119 - k) * 7919 % 1000:08d}"))
    return root


def test_first_100_classes_as_symlinks(in120, tmp_path):
    dst = str(tmp_path / "in100")
    mis.main(["--src", in120, "--dst", dst, "--num_classes", "100"])
    want = sorted(os.listdir(os.path.join(in120, "train")))[:100]
    assert sorted(os.listdir(os.path.join(dst, "train"))) == want
    assert sorted(os.listdir(os.path.join(dst, "val"))) == want
    for split, per in (("train", 2), ("val", 1)):
        files = [os.path.join(dst, split, c, f) for c in want for f in os.listdir(os.path.join(dst, split, c))]
        assert len(files) == 100 * per
        assert all(os.path.islink(f) for f in files)
        assert all(os.path.realpath(f) == os.path.realpath(os.path.join(in120, split, *f.split(os.sep)[-2:]))
                   for f in files)
    lines = open(os.path.join(dst, "train.txt")).read().splitlines()
    assert len(lines) == 200 and lines[0] == f"train/{want[0]}/img_0000.png 0" and lines[-1].endswith(" 99")
    assert len(open(os.path.join(dst, "val.txt")).read().splitlines()) == 100
    # same samples as --data_name imagenet100 on the full folder, and as the written list
    full = ImageDataset(os.path.join(in120, "train"), num_classes=100)
    sub = ImageDataset(os.path.join(dst, "train"))
    lst = ImageDataset(os.path.join(in120, "train"), file_list=os.path.join(dst, "train.txt"))
    assert [os.path.relpath(p, os.path.join(in120, "train")) for p, _ in full.samples] == \
           [os.path.relpath(p, os.path.join(dst, "train")) for p, _ in sub.samples]
    assert full.samples == lst.samples and full.targets == sub.targets
    mis.main(["--src", in120, "--dst", dst, "--num_classes", "100"])  # idempotent
    assert len(os.listdir(os.path.join(dst, "train"))) == 100


def test_subset_from_lists_and_errors(in120, tmp_path, repo_root):
    classes = sorted(os.listdir(os.path.join(in120, "train")))
    tl = tmp_path / "train.txt"
    tl.write_text("".join(f"train/{c}/img_0001.png {i}\n" for i, c in enumerate(classes[5:8])))
    vl = tmp_path / "val.txt"
    vl.write_text("".join(f"val/{c}/img_0000.png {i}\n" for i, c in enumerate(classes[6:8])))  # one class fewer
    dst = str(tmp_path / "sub")
    r = subprocess.run([sys.executable, "scripts/make_imagenet_subset.py", "--src", in120, "--dst", dst,
                        "--train_list", str(tl), "--val_list", str(vl), "--copy"],
                       cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(os.path.join(dst, "train"))) == classes[5:8]
    assert os.listdir(os.path.join(dst, "train", classes[6])) == ["img_0001.png"]
    assert not os.path.islink(os.path.join(dst, "val", classes[7], "img_0000.png"))
    # val.txt labels follow the training subset's class order, even with a class missing from val
    val_lines = open(os.path.join(dst, "val.txt")).read().splitlines()
    assert val_lines == [f"val/{classes[6]}/img_0000.png 1", f"val/{classes[7]}/img_0000.png 2"]
    r = subprocess.run([sys.executable, "scripts/make_imagenet_subset.py", "--src", in120, "--dst",
                        str(tmp_path / "x"), "--num_classes", "121"], cwd=repo_root, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "120 class folders" in r.stderr
