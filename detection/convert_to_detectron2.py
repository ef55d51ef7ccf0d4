#!/usr/bin/env python
"""Convert a pretraining checkpoint to the ``.pkl`` Detectron2 loads (MoCo/DisCo
``convert-pretrain-to-detectron2.py``; disco_pcl_evals.md C5).

    cd detection
    python convert_to_detectron2.py /path/ckpt/checkpoint_0199.pth.tar ./output.pkl
    python train_net.py --config-file configs/pascal_voc_R_50_C4_24k_moco.yaml --num-gpus 8 MODEL.WEIGHTS ./output.pkl

The backbone is read with ``load_backbone`` (any layout this repository knows: ours, MoCo, DisCo, PCL,
CaCo, MoCo-M/LORAC, SogCLR, SwAV, torchvision), every backbone key must load, the projection head and
momentum encoder are left out, and the keys are renamed for Detectron2 (``src/detection/d2_format.py``).
Only torchvision ResNets (18/34/50/101/152, ImageNet stem) fit Detectron2's ResNet backbone.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src import zoo
from src.checkpoint import extract_state_dict, load_backbone, load_checkpoint
from src.cli import HelpFormatter
from src.detection.d2_format import to_detectron2, write_pkl
from src.detection.model import require_imagenet_stem
from src.errors import UserError, cli_main
from src.models.backbones import arch_spec, canonical_arch

D2_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert a pretraining checkpoint (any layout load_backbone knows) to "
                                "Detectron2's .pkl", formatter_class=HelpFormatter)
    p.add_argument("input", help="pretraining checkpoint, e.g. checkpoint_0199.pth.tar")
    p.add_argument("output", help="Detectron2 weights to write, e.g. ./output.pkl")
    p.add_argument("-a", "--arch", default=None,
                   help="backbone architecture (None: the checkpoint's 'arch' entry)")
    return p


def checkpoint_arch(path: str, given: str | None) -> str:
    """``-a`` if given, else the ``arch`` the checkpoint records; refused when Detectron2 cannot take it."""
    arch = given
    if arch is None:
        ckpt = load_checkpoint(path)
        arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
        if not isinstance(arch, str):
            n = len(extract_state_dict(ckpt))
            raise UserError(f"{path} does not record its arch ({n} tensors): pass -a resnet50 (or resnet18/34/101/152)")
    arch_spec(arch)  # unknown names: the registry's one-line error
    if canonical_arch(arch) not in D2_ARCHS:
        raise UserError(f"arch {arch!r} cannot be converted: Detectron2's ResNet backbone takes torchvision "
                        f"ResNets only ({', '.join(D2_ARCHS)}); EfficientNet, MobileNet, SwAV-wide and ViT "
                        "backbones have no Detectron2 counterpart")
    return canonical_arch(arch)


@cli_main
def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    args.input = zoo.resolve_arg(args.input, "input", args.arch)   # a path, URL or zoo name (src/zoo.py)
    arch = checkpoint_arch(args.input, args.arch)
    net = load_backbone(args.input, arch)
    require_imagenet_stem(net, args.input)
    model = to_detectron2(net.state_dict())
    write_pkl(model, args.output)
    print(f"converted {len(model)} tensors of {arch} (key prefix {net.loaded_prefix!r} in {args.input}) "
          f"to {args.output}")
    return model


if __name__ == "__main__":
    main()
