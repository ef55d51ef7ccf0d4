"""DisCo's teacher: every accepted checkpoint layout (built synthetically with the official key names),
clear errors for wrong ones, the frozen teacher's parameters and BN buffers after training steps,
the SwAV ResNet variant, and the teacher check on resume."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from src.errors import UserError
from src.methods.disco import DisCo, check_same_teacher
from src.models.backbones import build_backbone, build_encoder, feat_dim
from src.models.heads import moco_head
from src.models.teacher import build_teacher, file_sha256, load_teacher


def _moco_state(arch: str, hidden: int = 2048, prefix: str = "module.", seed: int = 0) -> dict:
    """An official MoCo v2 / DisCo ``moco/`` checkpoint's state dict: encoder_q, encoder_k, queue."""
    torch.manual_seed(seed)
    enc = build_encoder(arch, moco_head(feat_dim(arch), 128, True, hidden))
    sd = {}
    for k, v in enc.state_dict().items():
        sd[f"{prefix}encoder_q.{k}"] = v
        sd[f"{prefix}encoder_k.{k}"] = v.clone() + (0.5 if v.is_floating_point() else 0)
    sd[f"{prefix}queue"] = torch.randn(128, 64)
    sd[f"{prefix}queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return sd


def _swav_state(arch: str, prototypes) -> dict:
    """A SwAV / DeepCluster-v2 raw state dict: ``module.`` + backbone, projection_head, prototypes."""
    torch.manual_seed(1)
    t = build_teacher(arch)
    sd = {f"module.{k}": v for k, v in t.state_dict().items()}
    if isinstance(prototypes, int):
        sd["module.prototypes.weight"] = torch.randn(prototypes, 128)
    else:
        for i, n in enumerate(prototypes):
            sd[f"module.prototypes.prototypes{i}.weight"] = torch.randn(n, 128)
    return sd


@pytest.fixture(scope="module")
def r50_moco(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "checkpoint_0199.pth.tar"
    sd = _moco_state("resnet50")
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {}}, p)
    return str(p), sd


def test_official_moco_layout_loads_query_encoder_and_drops_the_rest(r50_moco):
    path, sd = r50_moco
    t, info = load_teacher(path, "resnet50")
    assert info.layout == "module.encoder_q." and info.head == "MLP 2048-2048-128"
    assert torch.equal(t.state_dict()["layer4.2.bn3.running_var"], sd["module.encoder_q.layer4.2.bn3.running_var"])
    assert torch.equal(t.fc[2].weight, sd["module.encoder_q.fc.2.weight"])
    assert "module.queue" in info.dropped and "module.queue_ptr" in info.dropped
    assert sum(k.startswith("module.encoder_k.") for k in info.dropped) == sum(k.startswith("module.encoder_k.") for k in sd)
    assert not any(p.requires_grad for p in t.parameters())
    assert info.sha256 == file_sha256(path) and len(info.sha256) == 64


def test_moco_layout_without_ddp_prefix_and_linear_head(tmp_path):
    sd = _moco_state("resnet18", hidden=0, prefix="")
    sd = {k.replace("fc.0.", "fc."): v for k, v in sd.items()}  # a linear fc (MoCo v1 head)
    p = tmp_path / "t.pth"
    torch.save({"state_dict": sd}, p)
    t, info = load_teacher(str(p), "resnet18")
    assert info.layout == "encoder_q." and info.head == "linear 512-128" and isinstance(t.fc, nn.Linear)


@pytest.mark.parametrize("arch,prototypes", [("SWAVresnet50", 3000), ("DCresnet50", [300, 300, 300])])
def test_swav_format_raw_state_dicts(tmp_path, arch, prototypes):
    sd = _swav_state(arch, prototypes)
    p = tmp_path / "swav.pth.tar"
    torch.save(sd, p)  # the raw state dict at the top level, as the official releases
    t, info = load_teacher(str(p), arch)
    assert info.layout == "module."
    assert all(k.startswith("module.prototypes") for k in info.dropped) and len(info.dropped) == \
        (1 if isinstance(prototypes, int) else len(prototypes))
    assert torch.equal(t.projection_head[1].running_mean, sd["module.projection_head.1.running_mean"])
    t.eval()
    y = t(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 128) and torch.allclose(y.norm(dim=1), torch.ones(2), atol=1e-5)


def test_swav_resnet_variant_structure():
    """Extra 1-px ConstantPad2d, conv1 padding 2, widen multiplies every width (R50x2: 4096-d)."""
    m = build_backbone("SWAVresnet50")
    assert isinstance(m.padding, nn.ConstantPad2d) and m.conv1.padding == (2, 2) and feat_dim("SWAVresnet50") == 2048
    w2 = build_teacher("resnet50w2")
    assert w2.conv1.out_channels == 128 and w2.feat_dim == 4096 == feat_dim("resnet50w2")
    assert w2.projection_head[0].weight.shape == (8192, 4096) and isinstance(w2.projection_head[1], nn.BatchNorm1d)
    # same key names as the official swav/DisCo ``swav_resnet50.py`` (checked on the R50 teacher)
    assert set(build_teacher("SWAVresnet50").state_dict()) == set(w2.state_dict())
    # same output as torchvision's stem with padding 3 (the padding layer only moves the zeros)
    import torchvision
    tv = torchvision.models.resnet50()
    tv.load_state_dict({k: v for k, v in m.state_dict().items()}, strict=False)
    tv.fc = nn.Identity()
    m.eval(), tv.eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(m(x), tv(x), atol=1e-5)


def test_wrong_layouts_fail_with_the_key_names(tmp_path, r50_moco):
    path, sd = r50_moco
    with pytest.raises(UserError, match=r"does not fit --teacher_arch SWAVresnet50.*missing \(module\.conv1\.weight"
                                        r".*MoCo-style checkpoint"):
        load_teacher(path, "SWAVresnet50")
    with pytest.raises(UserError, match=r"mis-shaped \(e\.g\. module\.encoder_q\.layer1\.0\.conv1\.weight"):
        load_teacher(path, "resnet18")
    p = tmp_path / "swav.pth"
    torch.save(_swav_state("SWAVresnet50", 30), p)
    with pytest.raises(UserError, match=r"SwAV-format state dict"):
        load_teacher(str(p), "resnet50")
    extra = dict(sd)
    extra["module.teacher_encoder_q.conv1.weight"] = sd["module.encoder_q.conv1.weight"]
    p2 = tmp_path / "extra.pth"
    torch.save({"state_dict": extra}, p2)
    with pytest.raises(UserError, match=r"1 unexpected \(module\.teacher_encoder_q\.conv1\.weight\)"):
        load_teacher(str(p2), "resnet50")
    with pytest.raises(UserError, match="unknown --teacher_arch"):
        load_teacher(path, "resnet50x4")
    with pytest.raises(UserError, match="embeds in 128 dims, the student in --moco-dim 64"):
        load_teacher(path, "resnet50", dim=64)


def _disco(teacher_bn: str):
    torch.manual_seed(0)
    t = build_teacher("resnet18", moco_head(512, 16, True, 32))
    return DisCo("resnet18", t, "resnet18", dim=16, K=32, T=0.2, mlp=True, hidden=64, teacher_bn=teacher_bn,
                 teacher_info={"path": "t", "arch": "resnet18", "sha256": "ab" * 32})


@pytest.mark.parametrize("teacher_bn", ["train", "eval"])
def test_teacher_frozen_params_and_bn_buffers_after_steps(teacher_bn):
    m = _disco(teacher_bn)
    t0 = {k: v.clone() for k, v in m.teacher_encoder_q.state_dict().items()}
    q0 = m.queue.clone()
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.5, momentum=0.9)
    ids = {id(p) for p in m.teacher_encoder_q.parameters()}
    assert not any(id(p) in ids for g in opt.param_groups for p in g["params"])
    assert m.frozen_modules() == ["teacher_encoder_q"]
    m.train()
    assert m.teacher_encoder_q.training is (teacher_bn == "train") and m.encoder_q.training
    for _ in range(2):
        out = m([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    t1 = m.teacher_encoder_q.state_dict()
    for k, v in t0.items():
        is_stat = "running_" in k or "num_batches" in k
        if is_stat and teacher_bn == "train":  # official: BN keeps updating its running statistics
            assert not torch.equal(v, t1[k]), k
        else:
            assert torch.equal(v, t1[k]), k
    assert all(p.grad is None for p in m.teacher_encoder_q.parameters())
    assert not torch.equal(m.queue[:, :8], q0[:, :8]) and int(m.queue_ptr) == 8
    assert set(out) >= {"loss", "loss_moco", "loss_distill", "acc1"}


def test_loss_composition_matches_the_spec():
    m = _disco("eval")
    m.train()
    x = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    torch.manual_seed(3)
    a = m(x)
    assert torch.allclose(a["loss"], a["loss_moco"] + a["loss_distill"], atol=1e-6)
    m.only_mse = True
    assert torch.allclose(m(x)["loss"].detach(), m(x)["loss_distill"], atol=1e-6)
    m.only_mse, m.distill, m.use_mse = False, "rkd", True
    b = m(x)
    assert torch.allclose(b["loss"], b["loss_moco"] + b["loss_rkd_dist"] + b["loss_rkd_angle"] + b["loss_distill"], atol=1e-5)


def test_resume_checks_the_teacher_and_drops_the_unused_key_copy():
    m = _disco("train")
    sd = {k: v for k, v in m.state_dict().items()}
    sd["teacher_encoder_k.conv1.weight"] = torch.zeros(1)
    ck = {"teacher_info": dict(m.teacher_info)}
    out = m.state_dict_from_checkpoint(sd, ck)
    assert "teacher_encoder_k.conv1.weight" not in out and "teacher_encoder_q.conv1.weight" in out
    with pytest.raises(UserError, match="teacher file changed"):
        m.state_dict_from_checkpoint(sd, {"teacher_info": {**m.teacher_info, "sha256": "cd" * 32}})
    with pytest.raises(UserError, match="--teacher_arch resnet50, not resnet18"):
        check_same_teacher({"arch": "resnet50"}, m.teacher_info)
    m.state_dict_from_checkpoint(sd, {})  # official checkpoints carry no teacher_info


def test_checkpoints_leave_the_teacher_out_unless_save_teacher():
    from src.engine.resume import training_state
    m = _disco("train")
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    kw = dict(epoch=0, next_iter=0, arch="resnet18", method_name="disco", args={}, world_size=1, batch_size=4)
    ck = training_state(m, opt, scaler, **kw)
    assert not any("teacher_encoder" in k for k in ck["state_dict"]) and "module.queue" in ck["state_dict"]
    assert ck["teacher_info"]["sha256"] == "ab" * 32
    ck = training_state(m, opt, scaler, save_frozen=True, **kw)
    assert "module.teacher_encoder_q.conv1.weight" in ck["state_dict"]
