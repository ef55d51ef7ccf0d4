"""Detectron2-style configs without Detectron2 (for ``detection/train_torchvision.py``).

The same files and command lines as ``train_net.py``: a YAML file with ``_BASE_`` inheritance, then
``KEY VALUE`` overrides (``SOLVER.MAX_ITER 1000 MODEL.RESNETS.DEPTH 18``). :data:`DEFAULTS` holds the
Detectron2 default of every key the torchvision trainer implements (detectron2 ``config/defaults.py``);
any other key is refused with one line rather than silently ignored. YAML files are read with a loader
that rejects duplicate keys (DisCo's ``pascal_voc_R_50_C4_24k_moco.yaml`` has two ``MODEL:`` blocks, so
PyYAML silently keeps only the second; disco_pcl_evals.md C5, D3.4).
"""
from __future__ import annotations

import ast
import copy
import os
from typing import Any

import yaml

from ..errors import UserError

DEFAULTS: dict[str, Any] = {
    "VERSION": 2, "OUTPUT_DIR": "./output", "SEED": -1, "CUDNN_BENCHMARK": False,
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN", "WEIGHTS": "", "MASK_ON": False, "KEYPOINT_ON": False,
        "DEVICE": "cuda", "PIXEL_MEAN": [103.530, 116.280, 123.675], "PIXEL_STD": [1.0, 1.0, 1.0],
        "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
        "RESNETS": {"DEPTH": 50, "OUT_FEATURES": ["res4"], "NUM_GROUPS": 1, "NORM": "FrozenBN", "WIDTH_PER_GROUP": 64,
                    "STRIDE_IN_1X1": True, "RES5_DILATION": 1, "RES2_OUT_CHANNELS": 256, "STEM_OUT_CHANNELS": 64},
        "ANCHOR_GENERATOR": {"NAME": "DefaultAnchorGenerator", "SIZES": [[32, 64, 128, 256, 512]],
                             "ASPECT_RATIOS": [[0.5, 1.0, 2.0]], "OFFSET": 0.0},
        "PROPOSAL_GENERATOR": {"NAME": "RPN", "MIN_SIZE": 0},
        "RPN": {"HEAD_NAME": "StandardRPNHead", "IN_FEATURES": ["res4"], "IOU_THRESHOLDS": [0.3, 0.7],
                "BATCH_SIZE_PER_IMAGE": 256, "POSITIVE_FRACTION": 0.5, "SMOOTH_L1_BETA": 0.0,
                "BBOX_REG_WEIGHTS": (1.0, 1.0, 1.0, 1.0), "PRE_NMS_TOPK_TRAIN": 12000, "PRE_NMS_TOPK_TEST": 6000,
                "POST_NMS_TOPK_TRAIN": 2000, "POST_NMS_TOPK_TEST": 1000, "NMS_THRESH": 0.7, "BOUNDARY_THRESH": -1},
        "ROI_HEADS": {"NAME": "Res5ROIHeads", "NUM_CLASSES": 80, "IN_FEATURES": ["res4"], "IOU_THRESHOLDS": [0.5],
                      "BATCH_SIZE_PER_IMAGE": 512, "POSITIVE_FRACTION": 0.25, "SCORE_THRESH_TEST": 0.05,
                      "NMS_THRESH_TEST": 0.5, "PROPOSAL_APPEND_GT": True},
        "ROI_BOX_HEAD": {"BBOX_REG_WEIGHTS": (10.0, 10.0, 5.0, 5.0), "SMOOTH_L1_BETA": 0.0, "POOLER_RESOLUTION": 14,
                         "POOLER_SAMPLING_RATIO": 0, "POOLER_TYPE": "ROIAlignV2", "CLS_AGNOSTIC_BBOX_REG": False},
    },
    "INPUT": {"MIN_SIZE_TRAIN": (800,), "MIN_SIZE_TRAIN_SAMPLING": "choice", "MAX_SIZE_TRAIN": 1333,
              "MIN_SIZE_TEST": 800, "MAX_SIZE_TEST": 1333, "RANDOM_FLIP": "horizontal", "FORMAT": "BGR"},
    "DATASETS": {"TRAIN": (), "TEST": ()},
    "DATALOADER": {"NUM_WORKERS": 4, "ASPECT_RATIO_GROUPING": True, "FILTER_EMPTY_ANNOTATIONS": True,
                   "SAMPLER_TRAIN": "TrainingSampler"},
    "SOLVER": {"LR_SCHEDULER_NAME": "WarmupMultiStepLR", "MAX_ITER": 40000, "BASE_LR": 0.001, "MOMENTUM": 0.9,
               "NESTEROV": False, "WEIGHT_DECAY": 0.0001, "WEIGHT_DECAY_NORM": 0.0, "GAMMA": 0.1, "STEPS": (30000,),
               "WARMUP_FACTOR": 1.0 / 1000, "WARMUP_ITERS": 1000, "WARMUP_METHOD": "linear",
               "CHECKPOINT_PERIOD": 5000, "IMS_PER_BATCH": 16, "REFERENCE_WORLD_SIZE": 0, "BIAS_LR_FACTOR": 1.0,
               "WEIGHT_DECAY_BIAS": 0.0001, "AMP": {"ENABLED": False}},
    "TEST": {"EVAL_PERIOD": 0, "DETECTIONS_PER_IMAGE": 100, "PRECISE_BN": {"ENABLED": False, "NUM_ITER": 200}},
}

#: keys whose value must stay at the Detectron2 default here (the C4 protocol does not use the others)
FIXED = {"MODEL.META_ARCHITECTURE": "GeneralizedRCNN", "MODEL.KEYPOINT_ON": False,
         "MODEL.BACKBONE.NAME": "build_resnet_backbone", "MODEL.RESNETS.OUT_FEATURES": ["res4"],
         "MODEL.RESNETS.NUM_GROUPS": 1, "MODEL.RESNETS.WIDTH_PER_GROUP": 64, "MODEL.RESNETS.RES5_DILATION": 1,
         "MODEL.RESNETS.STEM_OUT_CHANNELS": 64, "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
         "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0, "MODEL.PROPOSAL_GENERATOR.NAME": "RPN",
         "MODEL.PROPOSAL_GENERATOR.MIN_SIZE": 0, "MODEL.RPN.HEAD_NAME": "StandardRPNHead",
         "MODEL.RPN.IN_FEATURES": ["res4"], "MODEL.RPN.BOUNDARY_THRESH": -1, "MODEL.ROI_HEADS.IN_FEATURES": ["res4"],
         "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": True, "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
         "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": False, "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
         "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR", "SOLVER.WARMUP_METHOD": "linear",
         "SOLVER.REFERENCE_WORLD_SIZE": 0, "SOLVER.BIAS_LR_FACTOR": 1.0, "SOLVER.NESTEROV": False,
         "DATALOADER.SAMPLER_TRAIN": "TrainingSampler"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(path: str) -> dict:
    """One YAML file (no ``_BASE_`` resolution); a duplicate key is a one-line error."""
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise UserError(f"{path}: {' '.join(str(e).split())}") from e
    return data or {}


def load_with_base(path: str) -> dict:
    """The file merged over its ``_BASE_`` chain (relative to the file, as Detectron2 resolves it)."""
    data = load_yaml(path)
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    merged = load_with_base(os.path.join(os.path.dirname(path), base))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _coerce(key: str, value: Any, default: Any) -> Any:
    """yacs' rules: a string that is not meant to be one is parsed as a Python literal; tuples and
    lists are interchangeable; ints are accepted for floats."""
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise UserError(f"config {key}: cannot parse {value!r} (expected a value like {default!r})") from None
    if isinstance(default, bool) or default is None:
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(f"config {key}: {value!r} has the wrong type (expected {type(default).__name__}, "
                        f"like the default {default!r})")
    return value


def _set(cfg: dict, key: str, value: Any) -> None:
    parts, node, default = key.split("."), cfg, DEFAULTS
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise UserError(f"config key {key} is not supported by train_torchvision.py (see docs/detection.md)")
        node, default = node[p], default[p]
    if parts[-1] not in node or isinstance(node[parts[-1]], dict):
        raise UserError(f"config key {key} is not supported by train_torchvision.py (see docs/detection.md)")
    node[parts[-1]] = _coerce(key, value, default[parts[-1]])


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def build_config(config_file: str | None, opts: list[str]) -> dict:
    """Defaults ← the config file (with its ``_BASE_`` chain) ← ``KEY VALUE`` pairs."""
    cfg = copy.deepcopy(DEFAULTS)
    if config_file:
        for key, value in _flatten(load_with_base(config_file)):
            _set(cfg, key, value)
    if len(opts) % 2:
        raise UserError(f"config overrides come in KEY VALUE pairs; got {len(opts)} words: {' '.join(opts)}")
    for key, value in zip(opts[::2], opts[1::2]):
        _set(cfg, key, value)
    for key, want in FIXED.items():
        if get(cfg, key) != want:
            raise UserError(f"config {key} = {get(cfg, key)!r}: train_torchvision.py implements {want!r} only "
                            "(the MoCo C4 protocol)")
    return cfg


def get(cfg: dict, key: str) -> Any:
    node = cfg
    for p in key.split("."):
        node = node[p]
    return node


def find_config(path: str, script_dir: str) -> str:
    """``path`` as given, else relative to ``script_dir`` (so ``--config-file configs/x.yaml`` works
    from the repository root and from ``detection/``)."""
    for cand in (path, os.path.join(script_dir, path)):
        if os.path.isfile(cand):
            return cand
    raise UserError(f"config file not found: {path} (also looked in {script_dir})")


def check_config(cfg: dict, eval_only: bool = False) -> list[str]:
    """One-line errors for what the torchvision detector cannot do; returns warnings (lines) for the
    legal but suspicious (the DisCo duplicate-key symptom, masks asked for, steps after the end)."""
    if get(cfg, "INPUT.FORMAT") != "RGB" or get(cfg, "MODEL.RESNETS.STRIDE_IN_1X1"):
        raise UserError("torchvision ResNets take RGB input with the stride in the 3x3 conv: set INPUT.FORMAT RGB "
                        "and MODEL.RESNETS.STRIDE_IN_1X1 False (the *_moco.yaml configs do)")
    if not get(cfg, "DATASETS.TEST"):
        raise UserError("DATASETS.TEST is empty")
    if not eval_only and not get(cfg, "DATASETS.TRAIN"):
        raise UserError("DATASETS.TRAIN is empty")
    if get(cfg, "INPUT.RANDOM_FLIP") not in ("horizontal", "none"):
        raise UserError(f"INPUT.RANDOM_FLIP {get(cfg, 'INPUT.RANDOM_FLIP')!r}: horizontal or none")
    warn = []
    if list(get(cfg, "MODEL.PIXEL_STD")) == [1.0, 1.0, 1.0]:
        warn.append("unusual setting: MODEL.PIXEL_STD is 1 (Caffe2-style normalisation) with RGB input: torchvision-"
                    "style weights expect the ImageNet mean/std (DisCo's duplicate-MODEL-key config had this effect)")
    if get(cfg, "MODEL.MASK_ON"):
        warn.append("MODEL.MASK_ON True: train_torchvision.py trains and evaluates boxes only (Faster R-CNN); "
                    "Mask R-CNN C4 needs train_net.py (Detectron2)")
    late = [s for s in get(cfg, "SOLVER.STEPS") if s >= get(cfg, "SOLVER.MAX_ITER")]
    if late and not eval_only:
        warn.append(f"unusual setting: SOLVER.STEPS {late} are at or after SOLVER.MAX_ITER {get(cfg, 'SOLVER.MAX_ITER')}")
    return warn
