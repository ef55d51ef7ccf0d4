"""The R-C4 Faster R-CNN of the MoCo detection protocol, from torchvision's detection package
(disco_pcl_evals.md C5, "Doing the same with torchvision detection").

- Backbone: a torchvision ResNet's ``conv1 … layer3`` (original names, so the pretrained weights load
  as they are), the stride-16 ``res4`` map; ``MODEL.BACKBONE.FREEZE_AT`` 0 = everything trainable.
- RPN: one level, anchors ``ANCHOR_GENERATOR.SIZES`` × ``ASPECT_RATIOS``; Detectron2's loss (smooth-L1
  with ``RPN.SMOOTH_L1_BETA``, 0 = L1; both terms summed and divided by ``BATCH_SIZE_PER_IMAGE`` ×
  images) instead of torchvision's β = 1/9 and sample-count normalisation.
- RoI head: ``torchvision.ops.roi_align(aligned=True)`` at 14×14 (Detectron2's ROIAlignV2; torchvision's
  ``MultiScaleRoIAlign`` is not aligned) → the pretrained ``layer4`` (its own BasicBlocks for R18/34,
  where Detectron2 builds three random bottlenecks) → an extra norm (``Res5ROIHeadsExtraNorm``) →
  average pool → class scores and class-specific boxes (init N(0, 0.01) / N(0, 0.001) as Detectron2);
  box loss smooth-L1 with ``ROI_BOX_HEAD.SMOOTH_L1_BETA`` over the sampled RoIs.
- Transform: RGB in [0, 1] normalised by ``PIXEL_MEAN/255``, ``PIXEL_STD/255``; the shorter side a random
  choice of ``MIN_SIZE_TRAIN`` in training, ``MIN_SIZE_TEST`` in evaluation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, roi_align

from ..errors import UserError
from ..models.backbones import arch_spec
from .config import get

NORMS = ("BN", "SyncBN", "naiveSyncBN", "FrozenBN")


class C4Backbone(nn.Module):
    """``conv1 … layer3`` of a torchvision ResNet → ``{"res4": stride-16 map}``."""

    def __init__(self, resnet: nn.Module, out_channels: int):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, name, getattr(resnet, name))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return {"res4": self.layer3(self.layer2(self.layer1(x)))}


class Res5Head(nn.Module):
    """The pretrained ``layer4`` on the pooled RoIs, the extra norm, then the spatial mean."""

    def __init__(self, layer4: nn.Module, out_channels: int, extra_norm: bool):
        super().__init__()
        self.layer4 = layer4
        self.norm = nn.BatchNorm2d(out_channels) if extra_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layer4(x)).mean(dim=(2, 3))


class AlignedRoIPool(nn.Module):
    """ROIAlignV2: ``roi_align(aligned=True)`` on the ``res4`` map (pixel centres at +0.5)."""

    def __init__(self, output_size: int, scale: float, sampling_ratio: int):
        super().__init__()
        self.output_size, self.scale, self.sampling_ratio = output_size, scale, sampling_ratio

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        x = features["res4"]
        return roi_align(x, [p.to(x.dtype) for p in proposals], self.output_size, self.scale, self.sampling_ratio,
                         aligned=True)


class D2RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with Detectron2's loss (see the module docstring)."""

    def __init__(self, *args, smooth_l1_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(neg, dim=0))[0]], dim=0)
        labels, regression_targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        box = F.smooth_l1_loss(pred_bbox_deltas[pos].float(), regression_targets[pos], beta=self.smooth_l1_beta,
                               reduction="sum")
        obj = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled].float(), labels[sampled], reduction="sum")
        return obj / normalizer, box / normalizer


class Res5RoIHeads(RoIHeads):
    """Box branch of Detectron2's ``Res5ROIHeads``: sample RoIs, pool, res5 head, predict; Detectron2's
    box loss (smooth-L1 β, summed over the foreground RoIs, divided by all sampled RoIs)."""

    def __init__(self, *args, smooth_l1_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        x = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(x)
        if self.training:
            labels, regression_targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
            fg = torch.where(labels > 0)[0]
            box = box_regression.reshape(box_regression.shape[0], -1, 4)[fg, labels[fg]]
            loss_box = F.smooth_l1_loss(box.float(), regression_targets[fg], beta=self.smooth_l1_beta, reduction="sum")
            return [], {"loss_cls": F.cross_entropy(class_logits.float(), labels),
                        "loss_box_reg": loss_box / max(labels.numel(), 1)}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "labels": c, "scores": s} for b, c, s in zip(boxes, labels, scores)], {}


class C4FasterRCNN(GeneralizedRCNN):
    """GeneralizedRCNN whose resize uses the training sizes in ``train()`` and the test size in ``eval()``."""

    def __init__(self, backbone, rpn, roi_heads, transform, train_sizes: tuple[int, ...], test_size: int,
                 max_size_train: int, max_size_test: int):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.sizes = {True: (tuple(train_sizes), max_size_train), False: ((test_size,), max_size_test)}
        self.train(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.transform.min_size, self.transform.max_size = self.sizes[bool(mode)]
        return self


def freeze_(module: nn.Module) -> nn.Module:
    """Detectron2's ``freeze()``: no gradient, every BatchNorm a FrozenBatchNorm2d (statistics fixed)."""
    module.requires_grad_(False)
    return frozen_bn(module)


def frozen_bn(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm2d`` of ``module`` → ``FrozenBatchNorm2d`` with its affine and statistics."""
    if isinstance(module, nn.BatchNorm2d):
        f = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(f, name).copy_(getattr(module, name).detach())
        return f
    for name, child in module.named_children():
        setattr(module, name, frozen_bn(child))
    return module


def build_detector(cfg: dict, resnet: nn.Module, arch: str) -> C4FasterRCNN:
    """The detector of ``cfg`` around ``resnet`` (a torchvision ResNet with its weights loaded)."""
    norm = get(cfg, "MODEL.RESNETS.NORM")
    if norm not in NORMS:
        raise UserError(f"MODEL.RESNETS.NORM {norm!r}: train_torchvision.py supports {', '.join(NORMS)}")
    head_name = get(cfg, "MODEL.ROI_HEADS.NAME")
    if head_name not in ("Res5ROIHeads", "Res5ROIHeadsExtraNorm"):
        raise UserError(f"MODEL.ROI_HEADS.NAME {head_name!r}: the C4 protocol uses Res5ROIHeadsExtraNorm "
                        "(or Res5ROIHeads, without the extra norm)")
    c5 = arch_spec(arch).feat_dim
    backbone = C4Backbone(resnet, c5 // 2)
    freeze_at = get(cfg, "MODEL.BACKBONE.FREEZE_AT")
    for k, names in enumerate((("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",)), start=1):
        if freeze_at >= k:
            for n in names:
                setattr(backbone, n, freeze_(getattr(backbone, n)))
    sizes, ratios = get(cfg, "MODEL.ANCHOR_GENERATOR.SIZES"), get(cfg, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
    if len(sizes) != 1 or len(ratios) != 1:
        raise UserError("MODEL.ANCHOR_GENERATOR: one list of SIZES and one of ASPECT_RATIOS (one feature map in C4)")
    anchors = AnchorGenerator((tuple(sizes[0]),), (tuple(ratios[0]),))
    bg, fg = get(cfg, "MODEL.RPN.IOU_THRESHOLDS")
    rpn = D2RegionProposalNetwork(
        anchors, RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]), fg, bg,
        get(cfg, "MODEL.RPN.BATCH_SIZE_PER_IMAGE"), get(cfg, "MODEL.RPN.POSITIVE_FRACTION"),
        {"training": get(cfg, "MODEL.RPN.PRE_NMS_TOPK_TRAIN"), "testing": get(cfg, "MODEL.RPN.PRE_NMS_TOPK_TEST")},
        {"training": get(cfg, "MODEL.RPN.POST_NMS_TOPK_TRAIN"), "testing": get(cfg, "MODEL.RPN.POST_NMS_TOPK_TEST")},
        get(cfg, "MODEL.RPN.NMS_THRESH"), smooth_l1_beta=get(cfg, "MODEL.RPN.SMOOTH_L1_BETA"))
    rpn.box_coder.weights = tuple(get(cfg, "MODEL.RPN.BBOX_REG_WEIGHTS"))
    num_classes = get(cfg, "MODEL.ROI_HEADS.NUM_CLASSES")
    predictor = FastRCNNPredictor(c5, num_classes + 1)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    for layer in (predictor.cls_score, predictor.bbox_pred):
        nn.init.zeros_(layer.bias)
    res = get(cfg, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION")
    iou = get(cfg, "MODEL.ROI_HEADS.IOU_THRESHOLDS")
    if len(iou) != 1:
        raise UserError("MODEL.ROI_HEADS.IOU_THRESHOLDS: one threshold (foreground >= it, background below)")
    roi_heads = Res5RoIHeads(
        AlignedRoIPool(res, 1.0 / 16, get(cfg, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO")),
        Res5Head(resnet.layer4, c5, head_name == "Res5ROIHeadsExtraNorm"), predictor, iou[0], iou[0],
        get(cfg, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"), get(cfg, "MODEL.ROI_HEADS.POSITIVE_FRACTION"),
        tuple(get(cfg, "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS")), get(cfg, "MODEL.ROI_HEADS.SCORE_THRESH_TEST"),
        get(cfg, "MODEL.ROI_HEADS.NMS_THRESH_TEST"), get(cfg, "TEST.DETECTIONS_PER_IMAGE"),
        smooth_l1_beta=get(cfg, "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA"))
    mean = [v / 255.0 for v in get(cfg, "MODEL.PIXEL_MEAN")]
    std = [v / 255.0 for v in get(cfg, "MODEL.PIXEL_STD")]
    train_sizes = get(cfg, "INPUT.MIN_SIZE_TRAIN")
    transform = GeneralizedRCNNTransform(min(train_sizes), get(cfg, "INPUT.MAX_SIZE_TRAIN"), mean, std)
    model = C4FasterRCNN(backbone, rpn, roi_heads, transform, train_sizes, get(cfg, "INPUT.MIN_SIZE_TEST"),
                         get(cfg, "INPUT.MAX_SIZE_TRAIN"), get(cfg, "INPUT.MAX_SIZE_TEST"))
    if norm == "FrozenBN":
        frozen_bn(model)
    return model


DEPTHS = (18, 34, 50, 101, 152)


def arch_of(cfg: dict) -> str:
    """``MODEL.RESNETS.DEPTH`` → torchvision arch; ``RES2_OUT_CHANNELS`` must fit it as in Detectron2."""
    depth, res2 = get(cfg, "MODEL.RESNETS.DEPTH"), get(cfg, "MODEL.RESNETS.RES2_OUT_CHANNELS")
    if depth not in DEPTHS:
        raise UserError(f"MODEL.RESNETS.DEPTH {depth}: choose from {', '.join(map(str, DEPTHS))}")
    want = 64 if depth in (18, 34) else 256
    if res2 != want:
        raise UserError(f"MODEL.RESNETS.DEPTH {depth} needs MODEL.RESNETS.RES2_OUT_CHANNELS {want} (got {res2})")
    return f"resnet{depth}"


def require_imagenet_stem(net: nn.Module, source: str) -> None:
    """Detection needs the 7×7 stride-2 stem + max-pool (the stride-16 ``res4`` map)."""
    if getattr(net, "conv1", None) is None or net.conv1.kernel_size != (7, 7):
        raise UserError(f"{source} has a CIFAR stem (3x3 conv1, no max-pool): the C4 detector (and Detectron2) "
                        "needs the ImageNet stem, 7x7 stride 2 + max-pool")


def pretrained_resnet(weights: str, arch: str) -> nn.Module:
    """The torchvision ResNet ``arch`` with the backbone of ``weights``: any checkpoint
    ``load_backbone`` reads, or a Detectron2-format ``.pkl`` of torchvision-style weights (the
    converter's output). Empty: random initialisation."""
    import logging

    from ..checkpoint import load_backbone, load_into_backbone
    from ..models.backbones import build_backbone
    from .d2_format import from_detectron2, read_pkl
    log = logging.getLogger("ssl")
    if not weights:
        log.warning("no pretrained weights (--pretrained / MODEL.WEIGHTS): the %s backbone is RANDOMLY initialised", arch)
        return build_backbone(arch)
    if "://" in weights:
        raise UserError(f"MODEL.WEIGHTS {weights}: train_torchvision.py reads local files only (Detectron2's "
                        "Caffe2 ImageNet models need Detectron2); pass --pretrained CKPT or MODEL.WEIGHTS ./output.pkl")
    if weights.endswith(".pkl"):
        net = build_backbone(arch)
        prefix = load_into_backbone(net, from_detectron2(read_pkl(weights)), arch, source=weights)
    else:
        net = load_backbone(weights, arch)
        prefix = net.loaded_prefix
    require_imagenet_stem(net, weights)
    log.info("backbone %s from %s (key prefix %r): conv1..layer3 -> backbone, layer4 -> RoI head", arch, weights, prefix)
    return net
