"""scripts/export_backbone.py: a plain torchvision state dict that loads back everywhere."""
from __future__ import annotations

import subprocess
import sys

import torch
import torchvision

from src.checkpoint import load_backbone
from src.methods.moco import MoCo


def test_export_backbone_roundtrip(tmp_path, repo_root):
    torch.manual_seed(0)
    m = MoCo("resnet18", dim=16, K=32, mlp=True)
    ck = tmp_path / "checkpoint_0001.pth.tar"
    torch.save({"epoch": 2, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in m.state_dict().items()},
                "optimizer": {}}, ck)
    out = tmp_path / "r18.pth"
    r = subprocess.run([sys.executable, "scripts/export_backbone.py", "--pretrained", str(ck), "-a", "resnet18",
                        "-o", str(out)], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    sd = torch.load(out, weights_only=True)
    tv = torchvision.models.resnet18()
    res = tv.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    assert torch.equal(tv.conv1.weight, m.encoder_q.conv1.weight)
    assert not torch.equal(sd["layer1.0.conv1.weight"], torch.zeros_like(sd["layer1.0.conv1.weight"]))
    again = load_backbone(str(out), "resnet18")
    assert again.loaded_prefix == "" and torch.equal(again.layer4[1].bn2.running_var, m.encoder_q.layer4[1].bn2.running_var)
    bad = subprocess.run([sys.executable, "scripts/export_backbone.py", "--pretrained", str(ck), "-a", "resnet50",
                          "-o", str(tmp_path / "x.pth")], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "does not fit arch 'resnet50'" in bad.stderr
