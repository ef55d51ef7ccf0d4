"""Initialisation as DisCo's code builds its networks (docs/disco.md "Initialisation"), and SyncBN
conversion of timm's fused norm-act layers."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from src.models.backbones import build_backbone, convert_sync_batchnorm
from src.models.heads import moco_head


def _last_bn_weights(enc):
    from torchvision.models.resnet import BasicBlock, Bottleneck
    out = []
    for m in enc.modules():
        if isinstance(m, Bottleneck):
            out.append(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            out.append(m.bn2.weight)
    return out


def test_moco_baselines_with_hidden_zero_init_the_last_bn(tiny_folder):
    import main_moco
    from src.methods.moco import MoCo
    seed = ["-a", "resnet18", "--mlp", "--hidden", "1280", tiny_folder]
    for argv, zero in ((seed, True), (seed[:3] + seed[5:], False), (seed + ["--zero_init_residual", "false"], False)):
        args = main_moco.get_parser().parse_args(argv)
        zi = main_moco.zero_init_residual(args)
        m = MoCo(args.arch, 16, 32, mlp=args.mlp, hidden=args.hidden, zero_init_residual=zi)
        ws = _last_bn_weights(m.encoder_q)
        assert len(ws) == 8 and all(bool((w == 0).all()) == zero for w in ws), argv
        assert all(bool((w == 0).all()) == zero for w in _last_bn_weights(m.encoder_k))


def test_disco_students_keep_torchvision_and_timm_init():
    from src.methods.disco import DisCo
    t = build_backbone("resnet18")
    t.fc = moco_head(512, 16, True, 32)
    m = DisCo("resnet18", t, "resnet18", dim=16, K=32, mlp=True, hidden=2048)
    assert all(bool((w == 1).all()) for w in _last_bn_weights(m.encoder_q))
    assert m.encoder_q.fc[0].weight.shape == (2048, 512) and m.encoder_q.fc[2].weight.shape == (16, 2048)
    # PyTorch's default Linear init (kaiming_uniform a=√5): |w| ≤ 1/√fan_in
    assert float(m.encoder_q.fc[0].weight.detach().abs().max()) <= 1 / 512 ** 0.5 + 1e-6


def test_hidden_zero_head_is_a_sequential_like_the_official_builder():
    assert list(moco_head(512, 128, True, 0).state_dict()) == ["0.weight", "0.bias"]
    assert isinstance(moco_head(512, 128, False, 2048), nn.Linear)


def test_sync_batchnorm_keeps_timm_activations():
    torch.manual_seed(0)
    net = build_backbone("efficientb0").eval()
    conv = convert_sync_batchnorm(copy.deepcopy(net)).eval()
    from timm.layers.norm_act import BatchNormAct2d
    acts = [type(m.act).__name__ for m in conv.modules() if isinstance(m, nn.SyncBatchNorm) and hasattr(m, "act")]
    assert acts and "SiLU" in acts
    assert not any(type(m) is BatchNormAct2d for m in conv.modules())
    assert list(conv.state_dict()) == list(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(conv(x), net(x), atol=1e-5)
    # torch's own converter would have dropped them
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).eval()
    assert not torch.allclose(plain(x), net(x), atol=1e-3)
