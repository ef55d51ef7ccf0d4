#!/usr/bin/env python
"""Export the backbone of any supported checkpoint as a plain torchvision/timm state dict.

    python scripts/export_backbone.py --pretrained checkpoint_0199.pth.tar -a resnet50 --output r50.pth
    python scripts/export_backbone.py --pretrained swav_r50_e800 -a resnet50 -o swav_r50.pth   # zoo name or URL

The output has the backbone's own key names (``conv1.weight``, ``layer1.0.bn1.running_mean``,
...) without projection head, so that ``torchvision.models.resnet50().load_state_dict(sd,
strict=False)`` reports only ``fc.weight``/``fc.bias`` missing, and every tool of this repository
(``--pretrained``) reads it as the "bare" layout.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src import zoo  # noqa: E402
from src.checkpoint import load_backbone, save_atomic  # noqa: E402
from src.errors import cli_main  # noqa: E402


@cli_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="checkpoint (any layout load_backbone knows): a path, an "
                   "http(s) URL or a zoo name (python -m src.zoo list; downloaded once into $SSL_CACHE)")
    p.add_argument("-a", "--arch", required=True)
    p.add_argument("--output", "-o", required=True, help="output .pth file")
    args = p.parse_args(argv)
    path = zoo.resolve_arg(args.pretrained, "--pretrained", args.arch)
    model = load_backbone(path, args.arch)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_atomic(sd, args.output)
    print(f"exported {len(sd)} tensors of {args.arch} (prefix {model.loaded_prefix!r} in the source) to {args.output}")


if __name__ == "__main__":
    main()
