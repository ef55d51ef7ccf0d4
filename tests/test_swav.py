"""SwAV pieces against references written from swav.md §2: Sinkhorn-Knopp (numpy), the
swapped-prediction loss (loops), the queue's fill and use, prototype freezing, 1 vs 2 processes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.errors import UserError
from src.methods.swav import SwAV, distributed_sinkhorn, swapped_prediction_loss, trimmed_queue_length
from tests.dist_utils import run_distributed


def np_sinkhorn(out: np.ndarray, eps: float, iters: int, world_size: int = 1) -> np.ndarray:
    """§2.3 in one process holding all W·N_loc columns (the all-reduced sums are plain sums)."""
    Q = np.exp(out.astype(np.float64) / eps).T
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(iters):
        Q /= Q.sum(axis=1, keepdims=True)
        Q /= K
        Q /= Q.sum(axis=0, keepdims=True)
        Q /= B
    Q *= B
    return Q.T


def scores(n: int = 24, k: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    c = F.normalize(torch.randn(k, 8, generator=g), dim=1)
    return z @ c.T


def test_sinkhorn_matches_numpy_reference():
    s = scores()
    for iters in (0, 1, 3):
        q = distributed_sinkhorn(s, 0.05, iters)
        ref = np_sinkhorn(s.numpy(), 0.05, iters)
        assert np.allclose(q.numpy(), ref, rtol=1e-5, atol=1e-7)
    q = distributed_sinkhorn(s, 0.05, 3).double()
    assert torch.allclose(q.sum(1), torch.ones(24, dtype=torch.float64), atol=1e-5)   # final ×B: columns sum to 1
    assert (q >= 0).all()
    q = distributed_sinkhorn(s, 0.05, 50).double()   # rows → B/K as the iterations converge (columns last)
    assert torch.allclose(q.sum(0), torch.full((10,), 24 / 10, dtype=torch.float64), rtol=5e-3)


def test_swapped_prediction_loss_matches_loops():
    V, B, K, tau = 5, 3, 7, 0.1
    s = scores(V * B, K, seed=1).view(V, B, K)
    A = [0, 2]
    codes = [torch.softmax(torch.randn(B, K), 1) for _ in A]
    ref = 0.0
    for i, a in enumerate(A):
        sub = 0.0
        for v in range(V):
            if v == a:
                continue
            for b in range(B):
                p = torch.softmax(s[v, b] / tau, 0)
                sub += -sum(float(codes[i][b, k]) * float(torch.log(p[k])) for k in range(K)) / B
        ref += sub / (V - 1)
    ref /= len(A)
    assert float(swapped_prediction_loss(s, codes, A, tau)) == pytest.approx(ref, rel=1e-5)


def tiny_swav(**kw) -> SwAV:
    torch.manual_seed(0)
    args = dict(hidden_mlp=16, feat_dim=8, nmb_prototypes=6, queue_length=8, epoch_queue_starts=1,
                freeze_prototypes_niters=2)
    args.update(kw)
    m = SwAV("resnet18", [2, 1], **args)
    return m.eval()   # BN on running stats: rows do not interact (1 vs 2 processes, references)


def batch(B: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(B, 3, 16, 16, generator=g)]


def test_queue_fill_and_use():
    """Epoch 0: no queue. From epoch 1: each step scores the queue with the current prototypes in front
    of the batch, keeps the batch's codes, then shifts in the batch's embeddings; used once full."""
    m, B = tiny_swav(), 4
    m.on_epoch_start(0)
    m(batch(seed=0))
    assert not m.queue.any() and not m._use_the_queue
    m.on_epoch_start(1)
    seen = []
    for step in range(3):
        crops = batch(seed=step + 1)
        before = m.queue.clone()
        m.normalize_prototypes_()
        with torch.no_grad():
            z, s = m.embed(crops)
        ref_codes = []
        for i, a in enumerate([0, 1]):
            out = s[a * B:(a + 1) * B]
            if step == 2:  # full after two batches (8 = 2 x 4 per process)
                out = torch.cat([before[0, i] @ m.prototypes.weight.T, out])
            ref_codes.append(distributed_sinkhorn(out, 0.05, 3)[-B:])
        codes = m.assign(z, s, B)
        assert m._use_the_queue == (step == 2)
        for c, r in zip(codes, ref_codes):
            assert torch.allclose(c, r, atol=1e-6)
        for i, a in enumerate([0, 1]):   # newest first, older rows shifted by B
            assert torch.equal(m.queue[0, i, :B], z[a * B:(a + 1) * B])
            assert torch.equal(m.queue[0, i, B:], before[0, i, :-B])
        seen.append(z)
    assert float(m.queue[0, 0, -1].norm()) == pytest.approx(1.0, abs=1e-5)
    m.on_epoch_start(2)
    assert not m._use_the_queue   # reset per epoch, re-armed by the full queue at the next step
    m(batch(seed=9))
    assert m._use_the_queue


def test_prototypes_frozen_then_trained():
    from src.engine import TrainStep
    from src.optim import LARC
    m = tiny_swav(queue_length=0, freeze_prototypes_niters=2).train()
    opt = LARC(m.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-6)
    step = TrainStep(opt, torch.device("cpu"), before_step=m.before_optimizer_step)
    m.on_epoch_start(0)
    w0 = F.normalize(m.prototypes.weight.detach().clone(), dim=1)
    head0 = m.projection_head[0].weight.detach().clone()
    for gs in range(4):
        step(lambda: m(batch(seed=gs)), 0.5, 0, gs, gs)
        if gs < 2:   # only the renormalisation touched them; no update, no momentum
            assert torch.allclose(m.prototypes.weight, w0, atol=1e-7), gs
            assert m.prototypes.weight not in opt.state or not opt.state[m.prototypes.weight]
        else:
            assert not torch.allclose(m.prototypes.weight, w0, atol=1e-4), gs
    assert not torch.equal(m.projection_head[0].weight, head0)
    m(batch(seed=7))   # renormalised before every forward
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(6), atol=1e-6)


def test_official_layout_and_bad_input():
    m = tiny_swav()
    keys = set(m.state_dict())
    assert {"conv1.weight", "layer4.1.bn2.weight", "projection_head.0.weight", "projection_head.1.running_mean",
            "projection_head.3.weight", "prototypes.weight", "queue"} <= keys
    assert not any(k.startswith(("encoder", "fc.")) for k in keys)
    assert m.prototypes.bias is None and m.queue.shape == (1, 2, 8, 8)
    with pytest.raises(UserError, match="crops_for_assign"):
        SwAV("resnet18", [2, 1], crops_for_assign=[0, 3])
    with pytest.raises(UserError, match="crops_for_assign"):
        SwAV("resnet18", [2, 1], crops_for_assign=[1, 1])
    assert trimmed_queue_length(3840, 64, 8) == 3584 and trimmed_queue_length(3840, 64, 4) == 3840


# ----------------------------------------------------------------------------- 1 vs 2 processes
def _dist(rank: int, world_size: int, s: torch.Tensor, steps: list) -> dict:
    n = s.shape[0] // world_size
    codes = distributed_sinkhorn(s[rank * n:(rank + 1) * n], 0.05, 3)
    m = tiny_swav(world_size=world_size, epoch_queue_starts=0)
    m.on_epoch_start(0)
    losses = []
    for crops in steps:   # this rank's half of every global batch
        b = crops[0].shape[0] // world_size
        losses.append(m([c[rank * b:(rank + 1) * b] for c in crops])["loss"].detach())
    return {"codes": codes, "queue": m.queue.clone(), "loss": losses}


def test_one_vs_two_processes():
    s = scores(24, 10, seed=3)
    steps = [batch(8, seed=i) for i in range(3)]
    one = _dist(0, 1, s, [])
    two = run_distributed(_dist, 2, s, steps)
    assert torch.allclose(torch.cat([two[0]["codes"], two[1]["codes"]]), one["codes"], atol=1e-6)
    assert torch.allclose(one["codes"], torch.from_numpy(np_sinkhorn(s.numpy(), 0.05, 3)).float(), atol=1e-6)
    # every rank holds every rank's queue; slot r = rank r's embeddings (newest first)
    assert torch.equal(two[0]["queue"], two[1]["queue"])
    q = two[0]["queue"]
    m = tiny_swav(world_size=1)
    with torch.no_grad():
        for r in range(2):
            z, _ = m.embed([c[r * 4:(r + 1) * 4] for c in steps[2]])
            assert torch.allclose(q[r, 0, :4], z[:4], atol=1e-5) and torch.allclose(q[r, 1, :4], z[4:8], atol=1e-5)
    assert two[0]["loss"][2] != two[1]["loss"][2]   # the queue (used at step 2) is per rank


def test_signal_mid_epoch_resumes_queue_exactly(tmp_path, tiny_folder):
    """SIGUSR1 in the middle of epoch 1 (queue full and in use) → checkpoint_interrupted.pth.tar;
    the resumed run ends with the weights and queue of an uninterrupted run."""
    import os
    import signal as sig
    from src.checkpoint import load_checkpoint
    from src.data.datasets import ImageDataset
    from src.data.transforms import MultiCropTransform
    from src.distributed import DistInfo
    from src.engine import CheckpointPolicy, EngineConfig, Trainer, seed_everything
    from src.optim import LARC, SwAVCosineLR

    class Signalling(SwAV):
        calls, fire_at = 0, None

        def forward(self, crops, index=None):
            Signalling.calls += 1
            if Signalling.calls == Signalling.fire_at:
                os.kill(os.getpid(), sig.SIGUSR1)
            return super().forward(crops, index)

    def trainer(out, fire_at=None):
        Signalling.calls, Signalling.fire_at = 0, fire_at
        seed_everything(0)
        m = Signalling("resnet18", [2, 1], hidden_mlp=16, feat_dim=8, nmb_prototypes=6, queue_length=16,
                       epoch_queue_starts=0, freeze_prototypes_niters=3)
        ds = ImageDataset(os.path.join(tiny_folder, "train"), MultiCropTransform([16, 8], [2, 1], [0.14, 0.05], [1, 0.14]))
        opt = LARC(m.parameters(), lr=0.6, momentum=0.9, weight_decay=1e-6)
        cfg = EngineConfig(epochs=2, batch_size=8, output_dir=str(out), checkpoint=CheckpointPolicy(str(out)),
                           method_name="swav", arch="resnet18", workers=0, print_freq=1, stop_check_every=1)
        return Trainer(m, opt, SwAVCosineLR(0.6, 0.0006, 2), ds, cfg, DistInfo())

    trainer(tmp_path / "ref").fit()
    run = tmp_path / "run"
    assert trainer(run, fire_at=6).fit() == {"interrupted": 1.0, "next_iter": 2.0}   # epoch 1, iteration 2
    trainer(run).fit()
    a = load_checkpoint(str(tmp_path / "ref" / "checkpoint_0001.pth.tar"))
    b = load_checkpoint(str(run / "checkpoint_0001.pth.tar"))
    assert a["state_dict"]["module.queue"].abs().sum(-1).gt(0).all()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
