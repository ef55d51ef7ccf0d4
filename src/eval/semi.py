"""Semi-supervised fine-tuning (``eval_semi.py``): the training subset, the network, the recipe, the
run checkpoint's subset record.

Protocol (disco_pcl_evals.md C3, PCL's pointer to MoPro ``finetune_imagenet.py``): the **whole**
pretrained network plus a new linear classifier is trained on a labelled subset of ``<data>/train``
with cross-entropy, BatchNorm in train mode, one SGD lr for every parameter (0.005, momentum 0.9,
wd 0, ×0.2 at epochs 20 and 30, 40 epochs, batch 256 per node), RandomResizedCrop + flip; top-1 and
top-5 on ``<data>/val`` (Resize + CenterCrop). The subset is

- a file list (``--train_list``): SimCLR's ``1percent.txt`` / ``10percent.txt`` (``<wnid>_<n>.JPEG``
  lines, class = the prefix before ``_``, every line used) or ``<relative path> [label]`` lines;
  read by :func:`src.data.datasets.read_file_list`, as ``eval_linear.py --train_list``;
- a seeded random fraction (``--fraction f --fraction_seed s``): MoPro's ``random.shuffle(samples)``
  then the first ``int(f·N)`` (:func:`random_fraction`; MoPro's images for ``--seed s`` in one process),
  or with ``--class_balanced`` ``max(1, int(f·n_c))`` random images of every class c;
- otherwise every image of ``<data>/train`` (e.g. a folder built by ``scripts/make_imagenet_fraction.py``).

The per-iteration loop, validation, loader, lr schedule and run checkpoint are the linear probe's
(:mod:`src.eval.linear`): fine-tuning is that loop with an empty frozen part
(``train_one_epoch(nn.Identity(), network, ...)``) and the whole network as the trained module.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random

import torch
from torch import nn

from .. import distributed as D
from ..checkpoint import load_backbone
from ..data.datasets import ImageDataset
from ..data.transforms import IMAGENET_STD
from ..errors import UserError
from ..models.backbones import arch_spec, build_backbone
from ..sanity import PREFIX
from .linear_data import imagenet_datasets
from .linear_presets import Recipe

log = logging.getLogger("ssl")

#: MoPro ``finetune_imagenet.py`` defaults (disco_pcl_evals.md C3)
DEFAULTS = {"lr": 0.005, "batch_size": 256, "epochs": 40, "schedule": (20, 30), "gamma": 0.2, "wd": 0.0,
            "momentum": 0.9, "workers": 32, "val_batch_size": 256}


# ----------------------------------------------------------------------------- subsets
def random_fraction(samples: list[tuple[str, int]], fraction: float, seed: int,
                    class_balanced: bool = False) -> list[tuple[str, int]]:
    """A seeded random subset of ``samples`` (in their sorted order), returned sorted.

    Default (MoPro): ``random.Random(seed).shuffle(samples)`` and the first ``int(fraction·N)``;
    torchvision's ImageFolder lists the same files in the same order, so this is MoPro's subset for
    ``--seed seed --low-resource fraction`` in a one-process run (its spawned DDP workers do not
    inherit the seed and each draw their own). ``class_balanced``: ``max(1, int(fraction·n_c))``
    images drawn without replacement from every class c (one ``Random(seed)`` stream, classes in
    label order), so every class is represented."""
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], not {fraction}")
    rng = random.Random(seed)
    if class_balanced:
        per_class: dict[int, list[tuple[str, int]]] = {}
        for s in samples:
            per_class.setdefault(s[1], []).append(s)
        out = [s for t in sorted(per_class)
               for s in rng.sample(per_class[t], max(1, int(fraction * len(per_class[t]))))]
    else:
        order = list(samples)
        rng.shuffle(order)
        out = order[:int(fraction * len(order))]
    if not out:
        raise UserError(f"--fraction {fraction} of {len(samples)} images keeps none: use a larger fraction "
                        "or --class_balanced")
    return sorted(out)


def subset_digest(ds: ImageDataset) -> str:
    """sha256 of the training subset (relative paths and labels): a resume must train on the same images."""
    h = hashlib.sha256()
    for p, t in ds.samples:
        h.update(f"{os.path.relpath(p, ds.root)}\t{t}\n".encode())
    return h.hexdigest()


def write_subset_list(ds: ImageDataset, path: str) -> None:
    """One ``<class>/<file>`` line (relative to ``<data>/train``) per training image: the list
    ``--train_list`` reads back, so a random subset can be reused by other runs and scripts."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(os.path.relpath(p, ds.root) + "\n" for p, _ in ds.samples)
    os.replace(tmp, path)


def finetune_datasets(args: argparse.Namespace, std, seed: int) -> tuple[ImageDataset, ImageDataset, str]:
    """(train subset, val restricted to its classes, a description of the subset).

    With ``--train_list`` the classes are those of the list (as ``eval_linear.py``); with
    ``--fraction`` and without either, the classes are every folder of ``<data>/train`` and the
    validation set is whole, also for classes that drew no training image (MoPro)."""
    root, size = args.data, args.image_size
    train, val = imagenet_datasets(root, size, std, args.train_list, None, seed)
    if args.train_list:
        return train, val, f"train_list {args.train_list}"
    if args.fraction is None:
        return train, val, "all of <data>/train"
    n = len(train)
    train.samples = random_fraction(train.samples, args.fraction, args.fraction_seed, args.class_balanced)
    train.targets = [t for _, t in train.samples]
    how = "class-balanced" if args.class_balanced else "uniform (MoPro)"
    return train, val, f"fraction {args.fraction:g} of {n} images, {how}, seed {args.fraction_seed}"


# ----------------------------------------------------------------------------- network and recipe
def build_network(pretrained: str, arch: str, num_classes: int, cifar_stem: bool = False) -> nn.Module:
    """The pretrained backbone (``load_backbone``: any known layout, every backbone key loaded, CIFAR
    stem detected) with a new ``Linear(feat_dim, num_classes)`` in the classifier slot (``fc`` of a
    ResNet, ``classifier`` of timm models), PyTorch's default Linear init as torchvision's ResNet
    constructor gives its ``fc``. The state dict is a plain torchvision / timm classifier's."""
    if pretrained:
        net = load_backbone(pretrained, arch)
        log.info("loaded backbone %s from %s (key prefix %r)", arch, pretrained, getattr(net, "loaded_prefix", ""))
    else:
        net = build_backbone(arch, cifar_stem=cifar_stem)
        log.warning("no --pretrained given: fine-tuning a RANDOMLY INITIALISED %s (a supervised baseline)", arch)
    spec = arch_spec(arch)
    setattr(net, spec.head_attr, nn.Linear(spec.feat_dim, num_classes))
    return net


def backbone_params(net: nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """Copies of the backbone's parameters (the classifier excluded)."""
    head = arch_spec(arch).head_attr
    return {k: p.detach().clone() for k, p in net.named_parameters() if k.split(".")[0] != head}


@torch.no_grad()
def relative_change(net: nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """‖θ − θ₀‖ / ‖θ₀‖ over the backbone parameters (θ₀ = the pretrained ones): 0 for a frozen backbone."""
    params = dict(net.named_parameters())
    ref = list(reference.values())
    diff = torch._foreach_sub([params[k].detach().to(v.device) for k, v in reference.items()], ref)
    num = torch.stack(torch._foreach_norm(diff)).double().pow(2).sum()
    den = torch.stack(torch._foreach_norm(ref)).double().pow(2).sum()
    return float((num / den.clamp_min(1e-30)).sqrt())


def finetune_recipe(args: argparse.Namespace, info: D.DistInfo) -> Recipe:
    """The effective settings: MoPro's semantics, ``-b`` and ``-j`` per node (split over its
    processes), the lr used as given (not scaled), step ×gamma at ``--schedule`` or ``--cos``."""
    n = info.local_world_size if info.distributed else 1
    if args.batch_size <= 0 or args.batch_size % n:
        raise UserError(f"batch size {args.batch_size} is not a positive multiple of the {n} processes of this node "
                        "(-b is the per-node batch)")
    per_proc = args.batch_size // n
    return Recipe(protocol="finetune", base_lr=args.lr, lr=args.lr, batch_size=args.batch_size,
                  batch_semantics="per_node", per_process_batch=per_proc, global_batch=per_proc * info.world_size,
                  scheduler="cosine" if args.cos else ("step" if args.schedule else "constant"),
                  milestones=list(args.schedule), gamma=args.gamma, final_lr=0.0, epochs=args.epochs, wd=args.wd,
                  momentum=args.momentum, nesterov=False, optimizer="sgd", std=IMAGENET_STD,
                  workers=(args.workers + n - 1) // n, val_batch_size=args.val_batch_size)


def single_image_batch_warning(n_images: int, per_process_batch: int, world_size: int) -> str | None:
    """BatchNorm in train mode needs more than one value per channel: a last batch of one image per
    process fails on a 1×1 feature map (small images) and gives one-image statistics otherwise."""
    per_rank = -(-n_images // world_size)  # the sampler pads every process to the same count
    if per_rank % per_process_batch != 1:
        return None
    return (f"{PREFIX}the last batch of every epoch holds 1 image per process ({n_images} images, "
            f"{per_process_batch} per process x {world_size}): BatchNorm trains on one image there (an error "
            "for small images whose last feature map is 1x1); change -b by one")


def check_run(ckpt: dict, path: str, classes: list[str], digest: str | None, n: int) -> None:
    """A checkpoint's classifier must have this run's classes (same order); a resumed run must also
    train on the same subset (``digest`` None: evaluation only, not checked)."""
    if ckpt.get("classes") is not None and list(ckpt["classes"]) != list(classes):
        raise UserError(f"{path} was fine-tuned on {len(ckpt['classes'])} classes, not the {len(classes)} classes "
                        "of this run's training set: same --train_list / data, or another checkpoint")
    want = ckpt.get("subset_sha256")
    if digest is None:
        return
    if want is not None and want != digest:
        raise UserError(f"{path} was fine-tuned on another training subset ({ckpt.get('train_images')} images, "
                        f"sha256 {want[:12]}) than this run's ({n} images, sha256 {digest[:12]}): same "
                        "--train_list / --fraction / --fraction_seed / --class_balanced, or another --dump_path")
