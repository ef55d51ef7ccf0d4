"""load_backbone on every checkpoint layout, and the one-line errors for bad input."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from src.checkpoint import latest_checkpoint, load_backbone, load_checkpoint, save_atomic
from src.data.datasets import ImageDataset
from src.errors import UserError
from src.models.backbones import build_encoder
from src.models.heads import bn_mlp, moco_head


def _encoder(arch="resnet18", head="moco"):
    torch.manual_seed(1)
    if head == "moco":
        return build_encoder(arch, moco_head(512, 16, mlp=True))
    return build_encoder(arch, bn_mlp(512, 32, 16))


def _layouts(enc):
    sd = enc.state_dict()
    bare = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    return {
        "ours/moco (module.encoder_q.)": {"epoch": 3, "arch": "resnet18",
                                          "state_dict": {**{f"module.encoder_q.{k}": v for k, v in sd.items()},
                                                         **{f"module.encoder_k.{k}": v + 1 for k, v in sd.items()},
                                                         "module.queue": torch.randn(16, 32),
                                                         "module.queue_ptr": torch.zeros(1, dtype=torch.long)},
                                          "optimizer": {}, "args": argparse.Namespace(lr=0.03)},
        "no-DDP (encoder_q.)": {"state_dict": {f"encoder_q.{k}": v for k, v in sd.items()}},
        "sogclr (module.base_encoder.)": {"state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()},
                                          "u": torch.zeros(10, 1)},
        "swav raw (module.)": {**{f"module.{k}": v for k, v in bare.items()},
                               "module.projection_head.0.weight": torch.randn(32, 512),
                               "module.prototypes.weight": torch.randn(10, 16)},
        "torchvision bare": dict(bare),
        "numpy scalars": {"state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items()},
                          "best_acc1": np.float64(67.5)},
    }


@pytest.mark.parametrize("layout", list(_layouts(_encoder()).keys()))
def test_load_backbone_every_layout(tmp_path, layout):
    enc = _encoder()
    path = str(tmp_path / "ckpt.pth.tar")
    torch.save(_layouts(enc)[layout], path)
    model = load_backbone(path, "resnet18")
    want = {k: v for k, v in enc.state_dict().items() if not k.startswith("fc.")}
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    if "encoder_q" in layout or "ours" in layout:
        assert "encoder_q" in model.loaded_prefix  # the query encoder, never encoder_k


def test_load_backbone_detects_cifar_stem(tmp_path):
    enc = build_encoder("resnet18", moco_head(512, 8, mlp=False))
    from src.models.backbones import apply_cifar_stem
    apply_cifar_stem(enc)
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}}, tmp_path / "c.pth")
    model = load_backbone(str(tmp_path / "c.pth"), "resnet18")
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, torch.nn.Identity)


def test_load_backbone_wrong_arch_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in _encoder().state_dict().items()}},
               tmp_path / "r18.pth")
    with pytest.raises(UserError, match=r"does not fit arch 'resnet50'.*(missing|mis-shaped)"):
        load_backbone(str(tmp_path / "r18.pth"), "resnet50")
    # a checkpoint with a backbone key missing
    sd = {f"module.encoder_q.{k}": v for k, v in _encoder().state_dict().items() if "layer4.1.bn2" not in k}
    torch.save({"state_dict": sd}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="layer4.1.bn2"):
        load_backbone(str(tmp_path / "partial.pth"), "resnet18")
    with pytest.raises(UserError, match="unknown arch"):
        load_backbone(str(tmp_path / "r18.pth"), "resnet7")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_backbone(str(tmp_path / "nope.pth"), "resnet18")


def test_weights_only_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(str(tmp_path / "evil.pth"))


def test_save_atomic_and_latest(tmp_path):
    for e in (0, 1, 10, 2):
        save_atomic({"epoch": e + 1}, str(tmp_path / f"checkpoint_{e:04d}.pth.tar"))
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_0010.pth.tar")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_dataset_errors_and_corrupt_images(tmp_path, tiny_folder):
    with pytest.raises(UserError, match="not found"):
        ImageDataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        ImageDataset(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        ImageDataset(str(tmp_path / "noimg"))
    # a corrupt file is skipped (the next image is used) and counted
    import shutil
    root = tmp_path / "corrupt"
    shutil.copytree(os.path.join(tiny_folder, "train"), root)
    bad = root / "class_000" / "img_0000.png"
    bad.write_bytes(b"not a png")
    from src.data.transforms import eval_transform
    ds = ImageDataset(str(root), eval_transform(32))
    img, target, index = ds[0]
    assert index == 0 and target == 0 and ds.num_skipped == 1  # index stays positional
    assert torch.equal(img, ds[1][0])  # the next readable image stands in
    # gathered evaluation features have a finite row and a valid label for every position
    from src.eval.features import extract_features
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    f, y = extract_features(net, ds, 5, 0, torch.device("cpu"))
    assert torch.isfinite(f).all() and y.tolist() == ds.targets


def test_file_list_with_missing_files(tmp_path, tiny_folder):
    root = os.path.join(tiny_folder, "train")
    lst = tmp_path / "list.txt"
    lst.write_text("class_000/img_0000.png\nclass_001/img_0001.png\nclass_001/nope.png\n")
    ds = ImageDataset(root, file_list=str(lst))
    assert len(ds) == 2 and ds.classes == ["class_000", "class_001"]
    with pytest.raises(UserError, match="3 of the 3 files .* wrong data root"):
        ImageDataset(str(tmp_path), file_list=str(lst))


@pytest.mark.parametrize("argv,msg", [
    (["/does/not/exist"], "data directory not found"),
    (["{empty}"], "has no 'train' folder"),
    (["{emptytrain}"], "no class folders"),
    (["-a", "resnet7", "{tiny}"], "unknown arch"),
])
def test_main_moco_bad_input_is_one_line(tmp_path, tiny_folder, repo_root, argv, msg):
    (tmp_path / "e").mkdir()
    (tmp_path / "et" / "train").mkdir(parents=True)
    argv = [a.format(empty=tmp_path / "e", emptytrain=tmp_path / "et", tiny=tiny_folder) for a in argv]
    r = subprocess.run([sys.executable, "main_moco.py", *argv, "--output_dir", str(tmp_path / "o")],
                       cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and msg in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_queue_not_divisible_is_one_line(tmp_path, tiny_folder, repo_root):
    r = subprocess.run([sys.executable, "main_moco.py", "-a", "resnet18", "-b", "6", "--moco-k", "64", "-j", "0",
                        "--image_size", "32", "--epochs", "1", "--output_dir", str(tmp_path), tiny_folder],
                       cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "must be divisible by the global batch size 6" in r.stderr
    assert "Traceback" not in r.stderr
