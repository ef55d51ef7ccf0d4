"""SogCLR pieces against slow loop references written from sogclr_caco.md Part A."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from src.methods.sogclr import SogCLR, dcl_loss, nt_xent, scatter_last_, sogclr_encoder
from src.models.heads import bn_mlp

T = 0.1
GAMMA = 0.9


# ----------------------------------------------------------------------------- references
def ref_dcl_step(z1, z2, idx, u, P, gamma=GAMMA, tau=T, detach_others=False, u_update="mean"):
    """One step of A1 with explicit loops over anchors and negatives.

    ``z1, z2``: global-batch projector outputs (B_g×d, rank r owns rows r·B … r·B+B−1);
    ``idx``: list of dataset indices; ``u``: dict index → float (0 when unseen, updated in place).
    The first-visit rule is checked per rank over its own rows (A1.7). Writes happen after all
    ranks computed, in gather order (rank, then row), so a repeated index keeps its last value.
    ``detach_others``: rank r sees other ranks' embeddings as constants (the official local-slice
    gather gradient). Returns the mean over ranks of the per-rank losses (= what DDP optimises)."""
    h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    Bg = h1.shape[0]
    B, n = Bg // P, 2 * (Bg - 1)
    writes, rank_losses = [], []
    for r in range(P):
        rows = list(range(r * B, (r + 1) * B))
        g = 1.0 if sum(u.get(idx[i], 0.0) for i in rows) == 0 else gamma
        H1 = [h1[j] if (j in rows or not detach_others) else h1[j].detach() for j in range(Bg)]
        H2 = [h2[j] if (j in rows or not detach_others) else h2[j].detach() for j in range(Bg)]
        loss_r = 0.0
        for i in rows:
            u_dir = []
            for a, A, Bv in ((h1[i], H1, H2), (h2[i], H2, H1)):
                s_pos = torch.dot(a, Bv[i])
                negs = [torch.dot(a, Bv[j]) for j in range(Bg) if j != i] + \
                       [torch.dot(a, A[j]) for j in range(Bg) if j != i]
                assert len(negs) == n
                ghat = sum(math.exp(s.item() / tau) for s in negs) / n
                ui = (1 - g) * u.get(idx[i], 0.0) + g * ghat
                weighted = sum((math.exp(s.item() / tau) / ui) * s for s in negs) / n
                loss_r = loss_r - (s_pos - weighted)
                u_dir.append(ui)
            writes.append((idx[i], (u_dir[0] + u_dir[1]) / (2 if u_update == "mean" else 1)))
        rank_losses.append(loss_r / B)
    for k, v in writes:
        u[k] = v
    return sum(rank_losses) / P


def ref_nt_xent(z1, z2, tau=T):
    """NT-Xent over the global batch: anchor a_i, positive b_i, the other 2B_g−1 embeddings in the
    denominator; mean over anchors of the sum of both directions."""
    h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    Bg = h1.shape[0]
    total = 0.0
    for i in range(Bg):
        for a, A, Bv in ((h1, h1, h2), (h2, h2, h1)):
            pos = torch.exp(torch.dot(a[i], Bv[i]) / tau)
            den = pos + sum(torch.exp(torch.dot(a[i], Bv[j]) / tau) for j in range(Bg) if j != i) + \
                sum(torch.exp(torch.dot(a[i], A[j]) / tau) for j in range(Bg) if j != i)
            total = total - torch.log(pos / den)
    return total / Bg


class Tiny(nn.Module):
    """A per-sample network (Linear body + the SogCLR projector) for exact comparisons; BN is in
    eval mode in the tests so that samples do not interact."""

    def __init__(self, d_in=12, feat=16, hidden=32, dim=8):
        super().__init__()
        self.body = nn.Linear(d_in, feat)
        self.fc = bn_mlp(feat, hidden, dim, num_layers=2, last_bn=True, last_bn_affine=False, bias=False)

    def forward(self, x):
        return self.fc(torch.relu(self.body(x.flatten(1))))


def tiny_method(loss_type="dcl", full_grad=False, N=12, u_update="mean", seed=0) -> SogCLR:
    torch.manual_seed(seed)
    m = SogCLR("resnet18", N, T=T, gamma=GAMMA, loss_type=loss_type, full_grad=full_grad, u_update=u_update,
               base_encoder=Tiny())
    for mod in m.modules():  # give the eval-mode BN non-trivial statistics
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def make_steps(Bg=8, d_in=12, seed=1):
    """Global batches: all new; all seen (permuted); seen + new with indices repeated across and
    inside the two rank halves (3 and 8 appear on both ranks, 3 twice overall)."""
    g = torch.Generator().manual_seed(seed)
    idxs = [[0, 1, 2, 3, 4, 5, 6, 7], [3, 0, 7, 1, 5, 2, 6, 4], [8, 9, 10, 3, 3, 11, 8, 2]]
    return [(torch.randn(Bg, d_in, generator=g), torch.randn(Bg, d_in, generator=g), torch.tensor(i))
            for i in idxs]


# ----------------------------------------------------------------------------- loss vs reference
@pytest.mark.parametrize("u_update", ["mean", "sum"])
def test_dcl_method_matches_loop_reference_over_steps(u_update):
    """Loss, parameter gradient and u after each of several steps (first visit, revisit, repeated
    indices) in one process, against the loop reference."""
    m = tiny_method(u_update=u_update)
    ref_model = tiny_method(u_update=u_update)
    u_ref: dict[int, float] = {}
    for x1, x2, idx in make_steps():
        m.zero_grad()
        out = m([x1, x2], idx)
        out["loss"].backward()
        ref_model.zero_grad()
        ref = ref_dcl_step(ref_model.base_encoder(x1), ref_model.base_encoder(x2), idx.tolist(), u_ref, P=1,
                           u_update=u_update)
        ref.backward()
        assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        for (name, p), q in zip(m.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        expect = torch.zeros(12)
        for k, v in u_ref.items():
            expect[k] = v
        torch.testing.assert_close(m.u, expect, rtol=1e-5, atol=0)
    assert (m.u > 0).sum().item() == 12


def test_first_visit_rule_and_gamma_weighting():
    """γ = 1 only when u is 0 at every local index; γ weights the new estimate; a partly seen
    batch gives new indices γ·ĝ (not ĝ)."""
    torch.manual_seed(0)
    h1, h2 = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    z = torch.zeros(4)
    _, u1_first, u2_first = dcl_loss(h1, h2, h1, h2, z, 1.0, T)
    m = SogCLR("resnet18", 10, T=T, gamma=0.3, base_encoder=Tiny(d_in=8)).eval()
    out = m.loss(h1, h2, torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(m.u[:4], (u1_first + u2_first) / 2)
    old = m.u[:4].clone()
    m.loss(h1, h2, torch.tensor([0, 1, 2, 3]))
    ghat = (u1_first + u2_first) / 2  # same embeddings → same fresh estimate
    torch.testing.assert_close(m.u[:4], 0.7 * old + 0.3 * ghat)
    m.loss(h1, h2, torch.tensor([2, 3, 4, 5]))  # 4, 5 unseen, but the batch is not all-zero
    torch.testing.assert_close(m.u[4:6], 0.3 * ghat[2:], rtol=1e-5, atol=0)
    assert out["u_mean"].item() == pytest.approx(ghat.mean().item(), rel=1e-6)


def test_dcl_gradient_formula_and_tau_scaling():
    """A1.10: with u equal to the batch estimate, ∇ of the surrogate is ∇[τ·log mean_neg exp(s/τ) − s_pos]."""
    torch.manual_seed(0)
    h1 = F.normalize(torch.randn(6, 5), dim=1).requires_grad_()
    h2 = F.normalize(torch.randn(6, 5), dim=1).requires_grad_()
    loss, _, _ = dcl_loss(h1, h2, h1, h2, torch.zeros(6), 1.0, T)
    g1, g2 = torch.autograd.grad(loss, (h1, h2))
    k1 = h1.detach().clone().requires_grad_()
    k2 = h2.detach().clone().requires_grad_()
    n, Bg = 2 * 5, 6
    eye = torch.eye(Bg, dtype=torch.bool)
    tot = 0.0
    for a, b in ((k1, k2), (k2, k1)):
        ab, aa = a @ b.T, (a @ a.T).masked_fill(eye, float("-inf"))
        negs = torch.cat([ab.masked_fill(eye, float("-inf")), aa], 1)
        tot = tot + (T * (torch.logsumexp(negs / T, 1) - math.log(n)) - ab.diagonal()).mean()
    r1, r2 = torch.autograd.grad(tot, (k1, k2))
    torch.testing.assert_close(g1, r1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g2, r2, rtol=1e-4, atol=1e-6)


def test_self_mask_is_finite_and_positive_excluded():
    """−1e9 (not −inf) keeps Σ w·s finite; the positive never enters u: u is the mean over the
    2(B_g−1) negatives only."""
    h = F.normalize(torch.randn(3, 4), dim=1)
    loss, u1, _ = dcl_loss(h, h, h, h, torch.zeros(3), 1.0, T)
    assert torch.isfinite(loss)
    s = h @ h.T
    for i in range(3):  # ab and aa blocks are equal here: negatives are j != i, twice
        expect = 2 * sum(math.exp(s[i, j].item() / T) for j in range(3) if j != i) / 4
        assert u1[i].item() == pytest.approx(expect, rel=1e-6)


def test_nt_xent_matches_reference():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    loss = nt_xent(h1, h2, h1, h2, T)
    ref = ref_nt_xent(z1, z2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    ga = torch.autograd.grad(loss, (z1, z2))
    gb = torch.autograd.grad(ref, (z1, z2))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    m = tiny_method("cl")
    x = torch.randn(4, 12)
    before = m.u.clone()
    out = m([x, x.flip(0)], torch.arange(4))
    assert out["loss"].item() == pytest.approx(ref_nt_xent(m.base_encoder(x), m.base_encoder(x.flip(0))).item(), rel=1e-5)
    assert torch.equal(m.u, before)  # cl keeps no state


def test_scatter_last_writer_wins():
    u = torch.zeros(6)
    scatter_last_(u, torch.tensor([1, 3, 1, 5, 3]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert u.tolist() == [0.0, 3.0, 0.0, 5.0, 0.0, 4.0]


def test_loss_is_fp32_under_autocast():
    m = tiny_method()
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m([x, x + 0.1], torch.arange(4))
    assert out["loss"].dtype == torch.float32 and m.u.dtype == torch.float32
    ref = tiny_method()([x, x + 0.1], torch.arange(4))["loss"]
    # the encoder ran in bf16, the loss in fp32: close to the fp32 value, not bf16-rounded
    assert out["loss"].item() == pytest.approx(ref.item(), rel=5e-2)


# ----------------------------------------------------------------------------- model / state
def test_projector_and_encoder_layout():
    m = SogCLR("resnet18", 7, dim=16, mlp_dim=32)
    sd = m.state_dict()
    assert tuple(sd["base_encoder.fc.0.weight"].shape) == (32, 512)
    assert tuple(sd["base_encoder.fc.3.weight"].shape) == (16, 32)
    assert "base_encoder.fc.1.weight" in sd and "base_encoder.fc.4.running_var" in sd
    assert "base_encoder.fc.4.weight" not in sd  # last BN without affine
    assert not any(k.endswith("bias") and k.startswith("base_encoder.fc.0") for k in sd)
    assert isinstance(m.base_encoder.fc[2], nn.ReLU) and len(m.base_encoder.fc) == 5
    assert m.base_encoder.layer1[0].bn2.weight.abs().sum().item() == 0  # zero-init residual
    assert tuple(sd["u"].shape) == (7,)
    ck = m.extra_checkpoint_items()
    assert tuple(ck["u"].shape) == (7, 1) and ck["u"].device.type == "cpu"
    three = sogclr_encoder("resnet18", 16, 32, num_proj_layers=3)
    assert len(three.fc) == 8


def test_u_restored_from_state_dict():
    a = tiny_method()
    x = torch.randn(4, 12)
    a([x, x * 0.5], torch.tensor([1, 4, 7, 9]))
    b = tiny_method(seed=3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.u, b.u) and (b.u > 0).sum().item() == 4


# ----------------------------------------------------------------------------- optimiser / schedule
def test_lars_matches_spec_loop():
    """A3: ndim>1: d = g + wd·p, d *= 0.001‖p‖/‖d‖ (1 if a norm is 0); ndim≤1: raw g; heavy ball."""
    from src.optim import LARS
    torch.manual_seed(0)
    ps = [torch.randn(4, 3), torch.randn(4), torch.zeros(2, 2)]
    params = [nn.Parameter(p.clone()) for p in ps]
    ref = [p.clone() for p in ps]
    mom = [torch.zeros_like(p) for p in ps]
    opt = LARS(params, lr=0.5, weight_decay=0.1, momentum=0.9)
    for step in range(3):
        grads = [torch.randn_like(p) for p in ps]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            d = g.clone()
            if ref[i].ndim > 1:
                d = d + 0.1 * ref[i]
                pn, dn = ref[i].norm().item(), d.norm().item()
                d = d * (0.001 * pn / dn if pn > 0 and dn > 0 else 1.0)
            mom[i] = 0.9 * mom[i] + d
            ref[i] = ref[i] - 0.5 * mom[i]
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.data, r, rtol=1e-6, atol=1e-7)


def test_warmup_cosine_schedule_and_lr_scaling():
    from main_sogclr import get_parser, scaled_lr
    from src.optim import WarmupCosineLR
    s = WarmupCosineLR(1.2, epochs=20, warmup_epochs=10)
    assert s(0, 0, 100) == 0.0
    assert s(5, 0, 100) == pytest.approx(0.6)
    assert s(2, 50, 100) == pytest.approx(1.2 * 2.5 / 10)  # per iteration
    assert s(10, 0, 100) == pytest.approx(1.2)
    assert s(15, 0, 100) == pytest.approx(0.6)
    assert s(19, 99, 100) == pytest.approx(1.2 * 0.5 * (1 + math.cos(math.pi * 9.99 / 10)))
    args = get_parser().parse_args(["--lr=.075", "--batch-size=256"])
    assert scaled_lr(args) == pytest.approx(1.2)
    args = get_parser().parse_args(["--lr=.3", "-b", "512", "--learning-rate-scaling=linear"])
    assert scaled_lr(args) == pytest.approx(0.6)


def test_augmentation_matches_a4():
    from torchvision import transforms as TV
    from src.data.transforms import GaussianBlur, sogclr_augmentation
    ops = sogclr_augmentation(224, 0.08).transforms
    assert isinstance(ops[0], TV.RandomResizedCrop) and ops[0].scale == (0.08, 1.0) and ops[0].size == (224, 224)
    jit = ops[1].transforms[0]
    assert ops[1].p == 0.8 and jit.brightness == (0.6, 1.4) and jit.saturation == (0.8, 1.2) and jit.hue == (-0.1, 0.1)
    assert isinstance(ops[2], TV.RandomGrayscale) and ops[2].p == 0.2
    assert isinstance(ops[3], GaussianBlur) and tuple(ops[3].sigma) == (0.1, 2.0)  # p = 1: always applied
    assert isinstance(ops[4], TV.RandomHorizontalFlip)
    assert not any("olariz" in type(o).__name__ for o in ops)
    assert ops[-1].mean == (0.485, 0.456, 0.406) and ops[-1].std == (0.229, 0.224, 0.225)


def test_checkpoint_policy_and_logdir():
    from main_sogclr import get_parser, logdir_name, should_save
    saved = [e for e in range(800) if should_save(e, 800)]
    # the condition of [S] train.py; 797 is not saved (800 − 797 = 3), whatever the spec's list says
    assert saved[:3] == [0, 10, 20] and saved[-4:] == [780, 790, 798, 799] and len(saved) == 82
    args = get_parser().parse_args("--lr=.075 --epochs=800 --batch-size=256 --data_name imagenet100".split())
    args.arch = "resnet50"
    assert logdir_name(args) == ("20221005_imagenet100_resnet50_sogclr-128-2048_bz_256_E800_WR10_lr_1.200_sqrt"
                                 "_wd_1e-06_t_0.1_g_0.9_lars")
