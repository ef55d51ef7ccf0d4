"""detection/convert_to_detectron2.py (disco_pcl_evals.md C5): ResNet-50 and ResNet-18 checkpoints in this
repository's layouts → Detectron2's .pkl (every key renamed, shapes and values kept, numpy, metadata);
the .pkl reads back to the same torchvision weights; backbones Detectron2 cannot take are one line."""
from __future__ import annotations

import importlib.util
import os
import pickle
import re

import numpy as np
import pytest
import torch

from src.checkpoint import load_into_backbone
from src.detection.d2_format import from_detectron2, read_pkl
from src.models.backbones import build_backbone, build_encoder
from src.models.heads import moco_head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("convert_to_detectron2", os.path.join(ROOT, "detection", "convert_to_detectron2.py"))
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)


def expected_name(k: str) -> str:
    """C5's rules, written out independently of the code under test."""
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(.*)", k)
    if m is None:  # the stem: conv1.weight, bn1.*
        return "stem.conv1.weight" if k == "conv1.weight" else "stem.conv1.norm." + k.split(".", 1)[1]
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = {"downsample.0.weight": "shortcut.weight"}.get(rest, rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    return f"res{stage}.{block}.{rest}"


def moco_checkpoint(path, arch: str, with_arch: bool = True) -> dict:
    """main_moco.py's layout: module.encoder_q.* (with the MLP head), module.encoder_k.*, the queue."""
    torch.manual_seed(0)
    enc = build_encoder(arch, moco_head(512 if arch == "resnet18" else 2048, 128, True))
    for m in enc.modules():  # non-trivial BN statistics, so that values are compared, not just names
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    sd = {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}
    sd["module.encoder_k.conv1.weight"] = torch.zeros(64, 3, 7, 7)
    sd["module.queue"] = torch.randn(128, 16)
    ck = {"epoch": 200, "state_dict": sd, "optimizer": {}}
    if with_arch:
        ck["arch"] = arch
    torch.save(ck, path)
    return {k: v for k, v in enc.state_dict().items() if not k.startswith("fc.")}


def load_pkl(path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def check_converted(out: dict, source: dict) -> None:
    assert out["__author__"] == "MOCO" and out["matching_heuristics"] is True and set(out) == {"model", "__author__",
                                                                                               "matching_heuristics"}
    model = out["model"]
    assert set(model) == {expected_name(k) for k in source}  # every key renamed; head, encoder_k, queue left out
    for k, v in source.items():
        a = model[expected_name(k)]
        assert isinstance(a, np.ndarray) and a.shape == tuple(v.shape) and np.array_equal(a, v.numpy())
    assert not any(re.search(r"layer|bn\d|downsample|encoder|queue|fc\.", k) for k in model)


def test_resnet50_moco_layout(tmp_path, capsys):
    src = moco_checkpoint(tmp_path / "checkpoint_0199.pth.tar", "resnet50")
    convert.main([str(tmp_path / "checkpoint_0199.pth.tar"), str(tmp_path / "output.pkl")])
    out = load_pkl(tmp_path / "output.pkl")
    check_converted(out, src)
    m = out["model"]
    for k in ("stem.conv1.weight", "stem.conv1.norm.running_var", "stem.conv1.norm.num_batches_tracked",
              "res2.0.shortcut.weight", "res2.0.shortcut.norm.bias", "res4.5.conv3.norm.weight", "res5.2.conv2.weight"):
        assert k in m
    assert m["res5.0.conv1.weight"].shape == (512, 1024, 1, 1) and m["res2.0.conv3.norm.num_batches_tracked"] == 7
    assert "key prefix 'module.encoder_q.'" in capsys.readouterr().out


def test_resnet18_exported_layout_and_readback(tmp_path):
    src = moco_checkpoint(tmp_path / "r18.pth.tar", "resnet18")
    torch.save(src, tmp_path / "r18_plain.pth")  # scripts/export_backbone.py's layout: bare keys, no arch
    convert.main(["-a", "resnet18", str(tmp_path / "r18_plain.pth"), str(tmp_path / "r18.pkl")])
    out = load_pkl(tmp_path / "r18.pkl")
    check_converted(out, src)
    assert "res3.0.shortcut.norm.running_mean" in out["model"] and "res2.0.shortcut.weight" not in out["model"]
    assert "res5.1.conv2.norm.weight" in out["model"] and not any("conv3" in k for k in out["model"])
    # what train_torchvision.py does with MODEL.WEIGHTS ./output.pkl: the same torchvision weights again
    net = build_backbone("resnet18")
    assert load_into_backbone(net, from_detectron2(read_pkl(str(tmp_path / "r18.pkl"))), "resnet18") == ""
    for k, v in net.state_dict().items():
        assert torch.equal(v, src[k]), k


def test_pkl_reader_runs_no_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": Evil()}, "__author__": "x"}, f)
    with pytest.raises(Exception, match="refusing to load"):
        read_pkl(str(tmp_path / "evil.pkl"))


@pytest.mark.parametrize("case, msg", [
    ("efficientnet", "cannot be converted: Detectron2's ResNet backbone takes torchvision ResNets only"),
    ("cifar", "has a CIFAR stem"),
    ("no_arch", "does not record its arch"),
    ("wrong_arch", "does not fit arch 'resnet50'"),
])
def test_unconvertible_backbones_are_one_line(tmp_path, capsys, case, msg):
    path = tmp_path / "ck.pth"
    if case == "efficientnet":
        torch.save({"arch": "efficientb0", "state_dict": {}}, path)
    elif case == "cifar":
        enc = build_backbone("resnet18", cifar_stem=True)
        torch.save({"arch": "resnet18", "state_dict": {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}}, path)
    elif case == "no_arch":
        torch.save(build_backbone("resnet18").state_dict(), path)
    else:
        moco_checkpoint(path, "resnet18")
    argv = [str(path), str(tmp_path / "o.pkl")] + (["-a", "resnet50"] if case == "wrong_arch" else [])
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.pkl").exists()


def test_seed_command_line(tmp_path, monkeypatch):
    """DisCo's ``python3 convert-pretrain-to-detectron2.py /path/ckpt/checkpoint_0199.pth.tar ./output.pkl``,
    script renamed (relative output in the working directory, arch from the checkpoint)."""
    moco_checkpoint(tmp_path / "checkpoint_0199.pth.tar", "resnet18")
    monkeypatch.chdir(tmp_path)
    convert.main([str(tmp_path / "checkpoint_0199.pth.tar"), "./output.pkl"])
    assert len(load_pkl(tmp_path / "output.pkl")["model"]) == 120  # R18: 20 convs + 20 BNs x 5 entries
