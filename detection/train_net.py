#!/usr/bin/env python
"""Detection transfer with Detectron2 (MoCo / DisCo ``detection/train_net.py``; disco_pcl_evals.md C5).

    pip install 'git+https://github.com/facebookresearch/detectron2.git'
    export DETECTRON2_DATASETS=/dev/shm
    cd detection
    python convert_to_detectron2.py /path/ckpt/checkpoint_0199.pth.tar ./output.pkl
    python train_net.py --config-file configs/pascal_voc_R_50_C4_24k_moco.yaml --num-gpus 8 --resume \
        MODEL.RESNETS.DEPTH 34 MODEL.RESNETS.RES2_OUT_CHANNELS 64

Registers ``Res5ROIHeadsExtraNorm``: Detectron2's C4 RoI head (``Res5ROIHeads``) with one more norm layer
(``MODEL.RESNETS.NORM``) after res5, as in the MoCo paper. ``MODEL.RESNETS.RES5_HEAD`` (added here):

- ``"bottleneck"`` (default; Detectron2 and the official runs): res5 is three BottleneckBlocks whatever
  the depth, so for R18/R34 the converted ``res5`` weights do not fit and that head starts random;
- ``"depth"``: the res5 blocks of ``MODEL.RESNETS.DEPTH`` (two / three BasicBlocks for R18 / R34), so the
  pretrained res5 loads (what ``train_torchvision.py`` always does).

Evaluation: COCO → ``COCOEvaluator`` (bbox, and segm with MASK_ON); VOC → ``PascalVOCDetectionEvaluator``
(AP, AP50, AP75; the VOC07 11-point metric on 2007 test).
"""
import os
import sys

try:
    import detectron2  # noqa: F401
except ImportError:
    sys.stderr.write("error: train_net.py needs Detectron2: pip install 'git+https://github.com/facebookresearch/"
                     "detectron2.git' (or run train_torchvision.py: the same protocol with torchvision only)\n")
    sys.exit(2)

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.layers import get_norm
from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from torch import nn

#: BasicBlocks in res5 for the depths built from them (torchvision's layer4)
BASIC_RES5_BLOCKS = {18: 2, 34: 3}


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """``Res5ROIHeads`` + an extra norm after res5 (module docstring for ``MODEL.RESNETS.RES5_HEAD``)."""

    @classmethod
    def _build_res5_block(cls, cfg):
        depth, norm = cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.NORM
        if cfg.MODEL.RESNETS.RES5_HEAD == "depth" and depth in BASIC_RES5_BLOCKS:
            out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
            n = BASIC_RES5_BLOCKS[depth]
            blocks = ResNet.make_stage(BasicBlock, n, stride_per_block=[2] + [1] * (n - 1),
                                       in_channels=out_channels // 2, out_channels=out_channels, norm=norm)
            res5 = nn.Sequential(*blocks)
        elif cfg.MODEL.RESNETS.RES5_HEAD in ("bottleneck", "depth"):
            res5, out_channels = super()._build_res5_block(cfg)
        else:
            raise ValueError(f"MODEL.RESNETS.RES5_HEAD must be 'bottleneck' or 'depth', not {cfg.MODEL.RESNETS.RES5_HEAD!r}")
        res5.add_module("norm", get_norm(norm, out_channels))
        return res5, out_channels


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        if "coco" in dataset_name:
            return COCOEvaluator(dataset_name, output_dir=output_folder)
        if "voc" in dataset_name:
            return PascalVOCDetectionEvaluator(dataset_name)
        raise ValueError(f"no evaluator for dataset {dataset_name!r} (coco_* or voc_*)")


def setup(args):
    cfg = get_cfg()
    cfg.MODEL.RESNETS.RES5_HEAD = "bottleneck"
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
