"""detection/configs (disco_pcl_evals.md C5, D3.4): every YAML loads with a duplicate-key-rejecting loader,
holds the MoCo/DisCo values, and src/detection/config.py reads them as Detectron2 would."""
from __future__ import annotations

import ast
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from src.detection import config as C
from src.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "detection", "configs")
RGB_MEAN, RGB_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def merged(name: str) -> dict:
    return C.load_with_base(os.path.join(CONFIGS, name))


def tup(v):  # Detectron2 parses "(400, 480)" strings with literal_eval
    return tuple(ast.literal_eval(v)) if isinstance(v, str) else tuple(v)


def test_every_yaml_loads_without_duplicate_keys():
    files = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))
    assert len(files) == 10
    for f in files:
        C.load_with_base(f)  # raises on a duplicate key anywhere in the _BASE_ chain


def test_the_loader_rejects_disco_duplicate_model_block(tmp_path):
    bad = tmp_path / "pascal_voc_R_50_C4_24k_moco.yaml"
    bad.write_text('MODEL:\n  PIXEL_MEAN: [123.675, 116.280, 103.530]\n  RESNETS:\n    STRIDE_IN_1X1: False\n'
                   'INPUT:\n  FORMAT: "RGB"\nMODEL:\n  WEIGHTS: "./output.pkl"\n')
    with pytest.raises(UserError, match="duplicate key 'MODEL'"):
        C.load_yaml(str(bad))


@pytest.mark.parametrize("name", ["pascal_voc_R_50_C4_24k_moco.yaml", "coco_R_50_C4_2x_moco.yaml",
                                  "moco/pascal_voc_R_50_C4_24k_moco.yaml", "moco/coco_R_50_C4_2x_moco.yaml"])
def test_moco_configs_hold_the_c5_values(name):
    c = merged(name)
    m = c["MODEL"]
    assert m["PIXEL_MEAN"] == RGB_MEAN and m["PIXEL_STD"] == RGB_STD and c["INPUT"]["FORMAT"] == "RGB"
    assert m["RESNETS"]["STRIDE_IN_1X1"] is False and m["WEIGHTS"] == "./output.pkl"
    assert m["META_ARCHITECTURE"] == "GeneralizedRCNN" and m["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"
    assert m["BACKBONE"]["FREEZE_AT"] == 0 and c["TEST"]["PRECISE_BN"]["ENABLED"] is True
    assert m["RPN"]["PRE_NMS_TOPK_TEST"] == 6000 and m["RPN"]["POST_NMS_TOPK_TEST"] == 1000
    disco = not name.startswith("moco/")
    assert m["RESNETS"]["NORM"] == ("SyncBN" if disco else "naiveSyncBN")
    voc = "pascal_voc" in name
    assert m["MASK_ON"] is (not voc)
    s = c["SOLVER"]
    if voc:
        assert m["ROI_HEADS"]["NUM_CLASSES"] == 20 and c["INPUT"]["MIN_SIZE_TEST"] == 800
        assert tup(c["DATASETS"]["TRAIN"]) == ("voc_2007_trainval", "voc_2012_trainval")
        assert tup(c["DATASETS"]["TEST"]) == ("voc_2007_test",) and tup(s["STEPS"]) == (18000, 22000)
        sizes = tup(c["INPUT"]["MIN_SIZE_TRAIN"])
        assert sizes == ((400,) if disco else ()) + tuple(range(480, 801, 32))
        assert (s["MAX_ITER"], s["WARMUP_ITERS"], s["IMS_PER_BATCH"], s["BASE_LR"]) == \
            ((48000, 200, 32, 0.01) if disco else (24000, 100, 16, 0.02))
    else:
        assert tup(c["INPUT"]["MIN_SIZE_TRAIN"]) == tuple(range(640, 801, 32))
        assert tup(c["DATASETS"]["TRAIN"]) == ("coco_2017_train",) and tup(c["DATASETS"]["TEST"]) == ("coco_2017_val",)
        assert tup(s["STEPS"]) == (120000, 160000) and s["MAX_ITER"] == 180000
        assert (s["IMS_PER_BATCH"], s["BASE_LR"]) == ((32, 0.01) if disco else (16, 0.02))


def test_build_config_merges_defaults_file_and_overrides():
    cfg = C.build_config(os.path.join(CONFIGS, "pascal_voc_R_50_C4_24k_moco.yaml"),
                         ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "SOLVER.STEPS", "(10, 20)",
                          "SOLVER.BASE_LR", "1", "DATASETS.TRAIN", "('voc_2007_trainval',)"])
    assert C.get(cfg, "MODEL.RESNETS.DEPTH") == 18 and C.get(cfg, "SOLVER.STEPS") == (10, 20)
    assert C.get(cfg, "SOLVER.BASE_LR") == 1.0 and isinstance(C.get(cfg, "SOLVER.BASE_LR"), float)
    assert C.get(cfg, "INPUT.MIN_SIZE_TRAIN")[0] == 400 and C.get(cfg, "DATASETS.TRAIN") == ("voc_2007_trainval",)
    assert C.get(cfg, "MODEL.RPN.PRE_NMS_TOPK_TRAIN") == 12000  # a Detectron2 default the files do not set
    assert C.get(cfg, "SOLVER.WEIGHT_DECAY_NORM") == 0.0 and C.get(cfg, "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA") == 0.0
    assert C.check_config(cfg) == []


@pytest.mark.parametrize("opts, msg", [
    (["MODEL.FPN.OUT_CHANNELS", "256"], "not supported"),
    (["SOLVER.MAX_ITER", "many"], "cannot parse"),
    (["SOLVER.MAX_ITER", "1.5"], "wrong type"),
    (["SOLVER.MAX_ITER"], "KEY VALUE pairs"),
    (["MODEL.KEYPOINT_ON", "True"], "implements False only"),
])
def test_bad_overrides_are_one_line(opts, msg):
    with pytest.raises(UserError, match=msg):
        C.build_config(os.path.join(CONFIGS, "pascal_voc_R_50_C4_24k_moco.yaml"), opts)


def test_check_config_refuses_bgr_and_warns():
    with pytest.raises(UserError, match="STRIDE_IN_1X1 False"):
        C.check_config(C.build_config(os.path.join(CONFIGS, "pascal_voc_R_50_C4_24k.yaml"), []))
    warn = C.check_config(C.build_config(os.path.join(CONFIGS, "coco_R_50_C4_2x_moco.yaml"),
                                         ["MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]", "SOLVER.MAX_ITER", "100"]))
    assert any("PIXEL_STD" in w for w in warn) and any("MASK_ON" in w for w in warn)
    assert any("SOLVER.STEPS" in w for w in warn)


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None, reason="Detectron2 is installed")
def test_train_net_without_detectron2_is_one_line():
    r = subprocess.run([sys.executable, "train_net.py", "--config-file", "configs/pascal_voc_R_50_C4_24k_moco.yaml",
                        "--num-gpus", "8", "--resume"], cwd=os.path.join(ROOT, "detection"), capture_output=True, check=False,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "pip install 'git+https://github.com/facebookresearch/detectron2.git'" in r.stderr
