"""CaCo: cooperative-adversarial contrastive learning with a learnable memory (sogclr_caco.md Part B).

Notation: W ∈ R^{C×K} the memory, D̂ = W / ‖W_j‖ (column-normalised), z the L2-normalised online
embeddings (gradient), κ the momentum keys (no gradient), l = z·D̂ the un-scaled cosine logits (N×K),
τ = ``--moco_t`` (encoder), τ_m = ``--mem_t`` (memory).

A *pair* (i, j, w) is "query crop i, positives chosen by key crop j, weight w":
- single crop: queries (q̃ = f_q(x₁), k̃ = f_q(x₂)), keys (q = f_k(x₁), k = f_k(x₂)), pairs (0,1,1), (1,0,1):
  the two directions are **summed** (B1);
- multi-crop: queries are all crops, keys the first two; pairs (i, j) with i ≠ j, j ∈ {0,1}; big pairs
  (i < 2) weigh 1/#big, small pairs 1/#small: the mean over each group, the groups summed (B1).

Encoder loss  L = Σ_pairs w · CE(l_i / τ, y_j),  y_j = argmax_k(κ_j · D̂)  (:func:`select_positives`).

Memory step (:func:`memory_grad`, :func:`memory_step_`), from the pre-step z, l and W, in fp32:
  p = softmax(l_i / τ_m);  a = p, except a[n, y_jn] = 1 − p[n, y_jn];
  G[:, k] = (I − d̂_k d̂_kᵀ) (1/N) Σ_n a_nk z_n / (τ_m ‖W_k‖);   g = −Σ_pairs w·G;  g ← mean over ranks;
  v ← μ v + g;  W ← W − η v.
For a column that is a negative of every query g = −∂L_τm/∂W (W ascends the loss: adversarial
negatives); the positive column's sign is flipped (it descends: cooperative positives).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from ..errors import UserError
from ..models.backbones import build_encoder, feat_dim
from ..models.heads import bn_mlp
from ..models.momentum import make_momentum_copy, momentum_update_
from .base import ContrastiveMethod, topk_accuracy

Pair = tuple[int, int, float]
AD_INIT_T = 0.2        # MoCo temperature of the --ad_init warm-up (B1)
AD_INIT_M = 0.999      # EMA momentum during --ad_init (the official forward's default)
MEMORY_SEED = 0        # W = randn from this seed: identical on every rank (B10.5)


# ----------------------------------------------------------------------------- pure functions
def normalized_memory(W: torch.Tensor) -> torch.Tensor:
    """D̂: W with unit-norm columns."""
    return F.normalize(W, dim=0)


@torch.no_grad()
def select_positives(keys: torch.Tensor, Dn: torch.Tensor) -> torch.Tensor:
    """y = argmax_k (κ·D̂_k): the memory slot nearest to each momentum key (B1.3)."""
    return torch.argmax(keys @ Dn, dim=1)


def crop_pairs(n_queries: int, multi_crop: bool) -> list[Pair]:
    """The (query, key, weight) pairs of B1: single crop (0,1,1), (1,0,1) — summed; multi-crop every
    query i against keys j ∈ {0,1}, i ≠ j, averaged within the big (i < 2) and the small group."""
    if not multi_crop:
        return [(0, 1, 1.0), (1, 0, 1.0)]
    big = [(i, j) for i in range(min(n_queries, 2)) for j in range(2) if i != j]
    small = [(i, j) for i in range(2, n_queries) for j in range(2)]
    return [(i, j, 1.0 / len(big)) for i, j in big] + [(i, j, 1.0 / len(small)) for i, j in small]


def pair_loss(logits: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], pairs: Sequence[Pair],
              T: float) -> torch.Tensor:
    """L = Σ_(i,j,w) w · CE(l_i / T, y_j), CE the mean over the local batch."""
    return sum(w * F.cross_entropy(logits[i] / T, labels[j]) for i, j, w in pairs)


@torch.no_grad()
def flipped_softmax(logits: torch.Tensor, labels: torch.Tensor, T: float) -> torch.Tensor:
    """a = softmax(l / T) with a[n, yₙ] replaced by 1 − p[n, yₙ]."""
    a = torch.softmax(logits / T, dim=1)
    rows = torch.arange(a.shape[0], device=a.device)
    a[rows, labels] = 1 - a[rows, labels]
    return a


@torch.no_grad()
def memory_grad(z: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                pairs: Sequence[Pair], W: torch.Tensor, T_mem: float) -> torch.Tensor:
    """The local memory gradient g (C×K, before the mean over ranks); see the module docstring.
    ``z[i]`` (N×C) and ``logits[i] = z[i]·D̂`` (N×K) are the cached pre-step query embeddings,
    ``labels[j]`` the positives chosen by key j. Closed form, no autograd over the K columns. The
    (I − d̂d̂ᵀ) projection uses d̂ᵀz = l: G = zᵀa/N − d̂ ⊙ mean_n(a ⊙ l)."""
    Dn = normalized_memory(W)
    coef: dict[int, torch.Tensor] = {}
    for i, j, w in pairs:  # Σ_j w·a_ij per query (G is linear in a)
        a = flipped_softmax(logits[i], labels[j], T_mem) * w
        coef[i] = coef[i] + a if i in coef else a
    G = torch.zeros_like(W)
    for i, a in coef.items():
        N = a.shape[0]
        G += z[i].T @ a / N - Dn * (a * logits[i]).mean(0)
    return -G / (W.norm(dim=0) * T_mem)


@torch.no_grad()
def memory_step_(W: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, lr: float) -> None:
    """Heavy ball, no weight decay (``--mem_wd`` is unused, B1): v ← μv + g, W ← W − η·v."""
    v.mul_(momentum).add_(g)
    W.sub_(v, alpha=lr)


# ----------------------------------------------------------------------------- schedules (B3)
def lr_at_epoch(epoch: int, init_lr: float, lr: float, lr_final: float, epochs: int, warmup: int) -> float:
    """Per epoch: init_lr·(e+1)/warmup during warmup, then cosine from init_lr to init_lr·lr_final/lr
    (the official ``adjust_learning_rate2``: lr_final is scaled by batch/256 like lr)."""
    if epoch < warmup:
        return init_lr * (epoch + 1) / warmup
    low = init_lr * lr_final / lr
    return low + 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))) * (init_lr - low)


def memory_lr_at_epoch(epoch: int, memory_lr: float, memory_lr_final: float, epochs: int, warmup: int) -> float:
    """Per epoch, not scaled by the batch: linear warmup, then cosine to memory_lr_final, or constant
    when the two are equal."""
    if epoch < warmup:
        return memory_lr * (epoch + 1) / warmup
    if memory_lr == memory_lr_final:
        return memory_lr
    return memory_lr_final + 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))) * \
        (memory_lr - memory_lr_final)


def momentum_at_epoch(epoch: int, moco_m: float, epochs: int, decay: bool) -> float:
    """``--moco_m_decay``: m = 1 − ½(1 + cos(π·e/E))(1 − m₀), rising to 1; else m₀."""
    if not decay:
        return moco_m
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - moco_m)


class CaCoEpochLR:
    """The engine's ``lr(epoch, it, iters)`` callable for :func:`lr_at_epoch` (constant within an epoch)."""

    def __init__(self, init_lr: float, lr: float, lr_final: float, epochs: int, warmup: int):
        self.args = (init_lr, lr, lr_final, epochs, warmup)

    def __call__(self, epoch: int, it: int = 0, iters: int = 1) -> float:
        return lr_at_epoch(epoch, *self.args)


# ----------------------------------------------------------------------------- the method
def caco_encoder(arch: str, dim: int = 256, mlp_dim: int = 2048, cifar_stem: bool = False) -> nn.Module:
    """ResNet (no zero-init residual) whose ``fc`` is the B2 projector: Linear → BN → ReLU → Linear →
    BN → ReLU → Linear, biases off, no final BN (keys ``fc.0 fc.1 fc.3 fc.4 fc.6``)."""
    head = bn_mlp(feat_dim(arch), mlp_dim, dim, num_layers=3, last_bn=False, bias=False)
    return build_encoder(arch, head, cifar_stem=cifar_stem)


class CaCo(ContrastiveMethod):
    """``encoder_q`` / ``encoder_k`` (EMA copy) and the buffers ``W`` (C×K) and ``v`` (its momentum).

    Per step: ``forward`` (EMA update before the keys, positives, loss; caches z, l, y) → the engine's
    optimiser step → :meth:`after_step` applies the memory step unless the step was skipped.
    ``m`` and the memory lr are per-epoch values set in :meth:`on_epoch_start`."""

    def __init__(self, arch: str, dim: int = 256, mlp_dim: int = 2048, K: int = 65536, moco_t: float = 0.08,
                 mem_t: float = 0.08, moco_m: float = 0.99, moco_m_decay: bool = True, mem_momentum: float = 0.9,
                 memory_lr: float = 3.0, memory_lr_final: float = 3.0, epochs: int = 200, warmup_epochs: int = 10,
                 multi_crop: bool = False, ad_init: bool = True, ad_init_lr: float = 0.0, cifar_stem: bool = False,
                 mem_wd: float = 0.0):
        super().__init__()
        self.arch, self.K, self.moco_t, self.mem_t = arch, K, moco_t, mem_t
        self.moco_m, self.moco_m_decay, self.mem_momentum, self.mem_wd = moco_m, moco_m_decay, mem_momentum, mem_wd
        self.memory_lr, self.memory_lr_final = memory_lr, memory_lr_final
        self.epochs, self.warmup_epochs, self.multi_crop = epochs, warmup_epochs, multi_crop
        self.ad_init, self.ad_init_lr = ad_init, ad_init_lr
        self.encoder_q = caco_encoder(arch, dim, mlp_dim, cifar_stem)
        self.encoder_k = make_momentum_copy(self.encoder_q)
        gen = torch.Generator().manual_seed(MEMORY_SEED)
        self.register_buffer("W", torch.randn(dim, K, generator=gen))
        self.register_buffer("v", torch.zeros(dim, K))
        self.m = momentum_at_epoch(0, moco_m, epochs, moco_m_decay)
        self.mem_lr = memory_lr_at_epoch(0, memory_lr, memory_lr_final, epochs, warmup_epochs)
        self._cache: tuple | None = None
        self._init_keys: torch.Tensor | None = None
        self.best_acc, self.knn_acc = 0.0, 0.0
        self._acc = [torch.zeros(()), 0]

    # ------------------------------------------------------------------ engine hooks
    def on_epoch_start(self, epoch: int, ctx: Any = None) -> None:
        """m and the memory lr are functions of the epoch only (also right after a resume)."""
        self.m = momentum_at_epoch(epoch, self.moco_m, self.epochs, self.moco_m_decay)
        self.mem_lr = memory_lr_at_epoch(epoch, self.memory_lr, self.memory_lr_final, self.epochs, self.warmup_epochs)
        self._acc = [torch.zeros((), device=self.W.device), 0]

    def after_step(self, step: Any = None) -> None:
        """The memory step of B1 from the cached pre-step outputs; nothing when the encoder step was
        skipped (``step.applied`` False: fp16 overflow)."""
        cache, self._cache = self._cache, None
        if cache is None or (step is not None and step.applied is False):
            return
        z, logits, labels, pairs = cache
        g = memory_grad(z, logits, labels, pairs, self.W.float(), self.mem_t)
        D.all_reduce_mean_(g)
        if self.mem_wd:  # off by default: the official step has no weight decay (--apply_mem_wd)
            g.add_(self.W, alpha=self.mem_wd)
        memory_step_(self.W, self.v, g.to(self.W.dtype), self.mem_momentum, self.mem_lr)

    def on_fresh_start(self, ctx: Any) -> None:
        """``--ad_init 1`` (B1): MoCo-style steps at lr = init_lr against the current memory, each
        writing its gathered momentum keys into the next column block of W, until K columns are
        filled; then θ_k ← θ_q. Runs through the engine's own step (AMP, logging).

        Resumable (not in the official code, which has no state to resume it from): after each
        iteration's keys are written, ``ctx.stop_point`` may stop the run; the checkpoint then holds
        the encoders, optimiser, W and, under ``warmup``, the iteration and the fill count, and the
        resumed run continues at the next unseen batch (``ctx.warmup_state``)."""
        if not self.ad_init:
            return
        resumed = ctx.warmup_state or {}
        start, filled = int(resumed.get("iter", 0)), int(resumed.get("filled", 0))
        for i, (crops, _, index) in enumerate(ctx.batches(0, start=start), start=start):
            out, _ = ctx.step(lambda c=crops, ix=index: ctx.forward(c, ix, phase="ad_init"), lr=self.ad_init_lr,
                              iteration=i)
            keys, self._init_keys = self._init_keys, None
            filled = self.write_keys_(keys, filled)
            ctx.log({"iter": i, "loss": float(out["loss"]), "acc1": float(out["acc1"]), "ad_init_filled": filled})
            if filled >= self.K:
                break
            ctx.stop_point(i + 1, {"filled": filled})
        if filled < self.K:
            raise UserError(f"--ad_init filled only {filled} of the {self.K} memory columns in one epoch: "
                            "lower --cluster or use --ad_init 0")
        with torch.no_grad():
            for pk, pq in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
                pk.copy_(pq)

    @torch.no_grad()
    def write_keys_(self, keys: torch.Tensor, filled: int) -> int:
        """W[:, filled : filled + B_g] = gathered keysᵀ (truncated at K); returns the new fill count."""
        keys = D.gather_no_grad(keys)
        n = min(keys.shape[0], self.K - filled)
        self.W[:, filled:filled + n] = keys[:n].T.to(self.W.dtype)
        return filled + n

    def extra_checkpoint_items(self) -> dict[str, Any]:
        """Official top-level keys: ``Memory_Bank`` (``CaCo_PN.state_dict()``), ``best_acc``, ``knn_acc``."""
        acc, n = self._acc
        if n:
            self.best_acc = max(self.best_acc, float(acc) / n)
        return {"Memory_Bank": {"W": self.W.detach().cpu().clone(), "v": self.v.detach().cpu().clone()},
                "best_acc": self.best_acc, "knn_acc": self.knn_acc}

    def state_dict_from_checkpoint(self, state_dict: dict[str, Any], ckpt: dict[str, Any]) -> dict[str, Any]:
        """An official checkpoint keeps W and v only under the top-level ``Memory_Bank``."""
        self.best_acc = float(ckpt.get("best_acc", 0.0) or 0.0)
        self.knn_acc = float(ckpt.get("knn_acc", 0.0) or 0.0)
        bank = ckpt.get("Memory_Bank")
        if "W" in state_dict or not isinstance(bank, dict):
            return state_dict
        return {**state_dict, "W": bank["W"], "v": bank["v"]}

    # ------------------------------------------------------------------ forward
    def _embed(self, enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(enc(x).float(), dim=1)

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor | None = None,
                phase: str = "train") -> dict[str, torch.Tensor]:
        if phase == "ad_init":
            return self._forward_ad_init(crops)
        if phase != "train":
            raise ValueError(f"unknown phase {phase!r}")
        queries = [self._embed(self.encoder_q, x) for x in crops]
        with torch.no_grad():
            momentum_update_(self.encoder_k, self.encoder_q, self.m)
            keys = [self._embed(self.encoder_k, x) for x in crops[:2]]
        with torch.autocast(queries[0].device.type, enabled=False):
            Dn = normalized_memory(self.W.float())
            logits = [z @ Dn for z in queries]
            labels = [select_positives(k, Dn) for k in keys]
            pairs = crop_pairs(len(queries), self.multi_crop)
            loss = pair_loss(logits, labels, pairs, self.moco_t)
            self._cache = ([z.detach() for z in queries], [lg.detach() for lg in logits], labels, pairs)
            i0, j0 = pairs[0][:2]
            acc1, acc5 = topk_accuracy(logits[i0].detach(), labels[j0])
            with torch.no_grad():
                p = torch.softmax(logits[i0].detach() / self.mem_t, 1)
                pos_prob = p[torch.arange(p.shape[0], device=p.device), labels[j0]].mean()
        self._acc = [self._acc[0].to(acc1.device) + acc1.detach(), self._acc[1] + 1]
        return {"loss": loss, "acc1": acc1, "acc5": acc5, "mem_pos_prob": pos_prob}

    def _forward_ad_init(self, crops: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official warm-up forward: the symmetric forward of crops 0 and 1 with m = 0.999,
        loss = CE([q̃·κ | q̃·D̂] / 0.2, 0) with κ = f_k(x₂); κ is kept for :meth:`write_keys_`."""
        self._cache = None
        q = self._embed(self.encoder_q, crops[0])
        self._embed(self.encoder_q, crops[1])  # as the official forward (BN statistics of encoder_q)
        with torch.no_grad():
            momentum_update_(self.encoder_k, self.encoder_q, AD_INIT_M)
            self._embed(self.encoder_k, crops[0])
            k = self._embed(self.encoder_k, crops[1])
        with torch.autocast(q.device.type, enabled=False):
            l_pos = (q * k).sum(1, keepdim=True)
            logits = torch.cat([l_pos, q @ normalized_memory(self.W.float())], 1) / AD_INIT_T
            target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            loss = F.cross_entropy(logits, target)
            acc1, acc5 = topk_accuracy(logits.detach(), target)
        self._init_keys = k
        return {"loss": loss, "acc1": acc1, "acc5": acc5}
