"""detection/train_torchvision.py (disco_pcl_evals.md C5) on a generated VOC devkit folder: DisCo's seed command
(script renamed) trains a ResNet-18 C4 Faster R-CNN from the converter's ./output.pkl with a decreasing loss,
PreciseBN and VOC07 AP; a run resumed from an intermediate checkpoint continues at its iteration and ends
with the same weights; auto-resume and --eval-only report the same AP; bad input is one line. Unit checks:
the C5 model recipe, Detectron2's RPN loss, the solver, PreciseBN, the resumable sampler."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from src.detection import config as C
from src.detection import train as T
from src.detection.data import DetectionDataset, IterationSampler, load_dataset
from src.detection.model import build_detector, pretrained_resnet
from src.detection.synthetic import make_voc_detection
from src.models.backbones import build_encoder
from src.models.heads import moco_head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "detection", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TV = _script("train_torchvision")
SMALL = ["DATASETS.TRAIN", "('voc_2007_trainval',)", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.05",
         "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "(5,)", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "3",
         "INPUT.MIN_SIZE_TRAIN", "(48, 64)", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TRAIN", "128",
         "INPUT.MAX_SIZE_TEST", "128", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
         "MODEL.RPN.POST_NMS_TOPK_TEST", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8",
         "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "6", "TEST.PRECISE_BN.NUM_ITER", "2", "DATALOADER.NUM_WORKERS", "0",
         "SEED", "3"]
SEED_CMD = ["--config-file", "configs/pascal_voc_R_50_C4_24k_moco.yaml", "--num-gpus", "1", "--resume",
            "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
FLAGS = ["-p", "1", "--test_batch_size", "4"]


def moco_r18(path) -> dict:
    torch.manual_seed(0)
    enc = build_encoder("resnet18", moco_head(512, 128, True))
    sd = {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, path)
    return sd


def jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """cwd = a folder holding ./output.pkl (converted from a MoCo-layout R-18); DETECTRON2_DATASETS = a
    generated VOC2007 (6 trainval / 4 test images of 64 px); the first run of the seed command."""
    root = tmp_path_factory.mktemp("det")
    make_voc_detection(str(root / "datasets"), 6, 4, size=64)
    moco_r18(root / "checkpoint_0199.pth.tar")
    old_cwd, old_env = os.getcwd(), os.environ.get("DETECTRON2_DATASETS")
    os.chdir(root)
    os.environ["DETECTRON2_DATASETS"] = str(root / "datasets")
    try:
        _script("convert_to_detectron2").main(["checkpoint_0199.pth.tar", "./output.pkl"])
        first = TV.main(FLAGS + SEED_CMD + SMALL + ["OUTPUT_DIR", "out1"])
        yield root, first
    finally:
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("DETECTRON2_DATASETS", None)
        else:
            os.environ["DETECTRON2_DATASETS"] = old_env


def test_seed_command_trains_with_decreasing_loss_and_reports_voc_ap(work):
    root, res = work
    out = root / "out1"
    log = [r for r in jsonl(out / "log.jsonl") if "loss" in r]
    assert [r["iter"] for r in log] == [0, 1, 2, 3, 4, 5]
    losses = [r["loss"] for r in log]
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(log[0])
    assert [r["lr"] for r in log] == pytest.approx([0.05 * 0.001, 0.05, 0.05, 0.05, 0.05, 0.005])
    voc = res["voc_2007_test"]
    assert set(voc) >= {"AP", "AP50", "AP75", "per_class_AP50"} and voc["classes_evaluated"] == 2
    assert set(voc["per_class_AP50"]) == {"cat", "dog"} and voc["metric"] == "VOC07 11-point"
    assert all(0.0 <= voc[k] <= 100.0 for k in ("AP", "AP50", "AP75")) and voc["AP50"] >= voc["AP75"]
    assert json.loads((out / "results.json").read_text()) == res
    assert {"last_checkpoint", "model_0000002.pth", "model_final.pth", "config.json"} <= set(os.listdir(out))
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    ck = torch.load(out / "model_final.pth", weights_only=True)
    assert ck["iteration"] == 6 and ck["arch"] == "resnet18" and ck["seed"] == 3
    mid = torch.load(out / "model_0000002.pth", weights_only=True)
    # PreciseBN re-estimated the statistics before model_final: BN buffers counted 2 batches
    assert int(ck["model"]["backbone.bn1.num_batches_tracked"]) == 2 and mid["iteration"] == 3


def test_resume_from_a_checkpoint_continues_at_its_iteration(work):
    root, first = work
    res = TV.main(FLAGS + ["--resume-from", "out1/model_0000002.pth"] + SEED_CMD + SMALL + ["OUTPUT_DIR", "out2"])
    log = [r for r in jsonl(root / "out2" / "log.jsonl") if "loss" in r]
    assert [r["iter"] for r in log] == [3, 4, 5]
    first_log = [r for r in jsonl(root / "out1" / "log.jsonl") if "loss" in r]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in first_log[3:]], rel=1e-5)
    a = torch.load(root / "out1" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(root / "out2" / "model_final.pth", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert res["voc_2007_test"]["AP"] == pytest.approx(first["voc_2007_test"]["AP"], abs=1e-6)


def test_auto_resume_of_a_finished_run_and_eval_only_report_the_same_ap(work, capsys):
    root, first = work
    again = TV.main(FLAGS + SEED_CMD + SMALL + ["OUTPUT_DIR", "out1"])  # model_final.pth: nothing left to train
    assert again == first
    assert TV.main(FLAGS + ["--eval-only"] + SEED_CMD + SMALL + ["OUTPUT_DIR", "out1"]) == first
    assert len([r for r in jsonl(root / "out1" / "log.jsonl") if "loss" in r]) == 6


@pytest.mark.parametrize("extra, msg", [
    (["DATASETS.TEST", "('voc_2007_val',)"], "ImageSets/Main/val.txt not found"),
    (["MODEL.RESNETS.DEPTH", "34"], "does not fit arch 'resnet34'"),
    (["MODEL.RESNETS.RES2_OUT_CHANNELS", "256"], "RES2_OUT_CHANNELS 64"),
    (["MODEL.FPN.NORM", "GN"], "not supported"),
    (["--pretrained", "nope.pth"], "--pretrained checkpoint not found"),
])
def test_bad_input_is_one_line(work, capsys, extra, msg):
    opts = SEED_CMD + SMALL + ["OUTPUT_DIR", "bad"]
    argv = FLAGS + extra + opts if extra[0].startswith("--") else FLAGS + opts + extra
    with pytest.raises(SystemExit) as e:
        TV.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and err.count("\n") == 1, err


def test_non_moco_config_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        TV.main(["--config-file", "configs/pascal_voc_R_50_C4_24k.yaml"])
    assert e.value.code == 2 and "STRIDE_IN_1X1 False" in capsys.readouterr().err


# ----------------------------------------------------------------------------- units
def small_cfg(*extra: str) -> dict:
    return C.build_config(os.path.join(ROOT, "detection", "configs", "pascal_voc_R_50_C4_24k_moco.yaml"),
                          ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", *extra])


def test_model_follows_the_c5_recipe(tmp_path):
    sd = moco_r18(tmp_path / "ck.pth.tar")
    model = build_detector(small_cfg(), pretrained_resnet(str(tmp_path / "ck.pth.tar"), "resnet18"), "resnet18")
    assert torch.equal(model.backbone.layer3[1].conv2.weight, sd["module.encoder_q.layer3.1.conv2.weight"])
    head = model.roi_heads.box_head  # the pretrained layer4 (BasicBlocks) + the extra norm
    assert torch.equal(head.layer4[0].conv1.weight, sd["module.encoder_q.layer4.0.conv1.weight"])
    assert isinstance(head.norm, torch.nn.BatchNorm2d) and head.norm.num_features == 512
    assert model.backbone.out_channels == 256 and all(p.requires_grad for p in model.parameters())
    pool = model.roi_heads.box_roi_pool
    assert (pool.output_size, pool.scale, pool.sampling_ratio) == (14, 1 / 16, 0)
    assert model.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)
    assert model.rpn._pre_nms_top_n == {"training": 12000, "testing": 6000}
    assert model.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 512 and model.roi_heads.detections_per_img == 100
    assert model.roi_heads.box_predictor.cls_score.out_features == 21
    assert model.transform.min_size == (400,) + tuple(range(480, 801, 32))
    model.eval()
    assert model.transform.min_size == (800,)
    assert model.transform.image_mean == pytest.approx([0.485, 0.456, 0.406])
    frozen = build_detector(small_cfg("MODEL.BACKBONE.FREEZE_AT", "2"), pretrained_resnet("", "resnet18"), "resnet18")
    assert not frozen.backbone.layer1[0].conv1.weight.requires_grad and frozen.backbone.layer2[0].conv1.weight.requires_grad


def test_rpn_loss_is_detectron2s():
    model = build_detector(small_cfg(), pretrained_resnet("", "resnet18"), "resnet18")
    labels = [torch.tensor([1.0, 0.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])]
    targets = [torch.randn(4, 4), torch.randn(4, 4)]
    logits, deltas = torch.randn(8, 1), torch.randn(8, 4)
    obj, box = model.rpn.compute_loss(logits, deltas, labels, targets)
    lab, tgt = torch.cat(labels), torch.cat(targets)
    keep, pos = lab >= 0, lab == 1
    norm = 256 * 2  # BATCH_SIZE_PER_IMAGE x images, not the number of sampled anchors
    want_obj = torch.nn.functional.binary_cross_entropy_with_logits(logits[keep, 0], lab[keep], reduction="sum") / norm
    assert obj.item() == pytest.approx(want_obj.item(), rel=1e-6)
    assert box.item() == pytest.approx(((deltas[pos] - tgt[pos]).abs().sum() / norm).item(), rel=1e-6)  # beta 0: L1


def test_solver_groups_and_schedule():
    cfg = small_cfg("SOLVER.BASE_LR", "0.1", "SOLVER.WARMUP_ITERS", "10", "SOLVER.STEPS", "(20, 30)")
    model = build_detector(cfg, pretrained_resnet("", "resnet18"), "resnet18")
    opt = T.build_optimizer(model, cfg)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(model.backbone.bn1.weight)] == 0.0 and wd[id(model.roi_heads.box_head.norm.bias)] == 0.0
    assert wd[id(model.backbone.conv1.weight)] == 1e-4 and wd[id(model.rpn.head.conv[0][0].bias)] == 1e-4
    assert len(wd) == sum(1 for p in model.parameters() if p.requires_grad)
    lrs = [T.lr_at(cfg, it) for it in (0, 5, 10, 19, 20, 29, 30)]
    assert lrs == pytest.approx([0.1 * 0.001, 0.1 * (0.001 * 0.5 + 0.5), 0.1, 0.1, 0.01, 0.01, 0.001])


def test_precise_bn_is_the_average_of_batch_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))

    class Wrap(torch.nn.Module):  # the detector's call signature: model(images, targets)
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images, targets):
            return self.net(torch.stack(images))
    xs = [[torch.randn(3, 5, 5) * (i + 1) for _ in range(2)] for i in range(3)]
    batches = iter([(x, [{"boxes": torch.zeros(0, 4)}] * 2, None) for x in xs])
    assert T.precise_bn_(Wrap(), batches, 3, torch.device("cpu"), contextlib.nullcontext) == 1
    with torch.no_grad():
        feats = [net[0](torch.stack(x)) for x in xs]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(1, unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(net[1].running_mean, mean, atol=1e-5) and torch.allclose(net[1].running_var, var, atol=1e-4)
    assert net[1].momentum == 0.1 and net.training


def test_iteration_sampler_resumes_and_shards_the_same_stream():
    def take(s, n):
        it = iter(s)
        return [next(it) for _ in range(n)]
    full = take(IterationSampler(10, 4, seed=5), 4 * 7)  # 7 iterations of one process, batch 4
    assert sorted(i for i, e in full[:10]) == list(range(10)) and {e for _, e in full[:10]} == {0}
    assert take(IterationSampler(10, 4, seed=5, start_iter=3), 4 * 4) == full[12:]
    r0, r1 = take(IterationSampler(10, 2, 2, 0, seed=5), 14), take(IterationSampler(10, 2, 2, 1, seed=5), 14)
    for k in range(7):  # two processes x 2 read exactly the global batch of one process x 4
        assert r0[2 * k:2 * k + 2] + r1[2 * k:2 * k + 2] == full[4 * k:4 * k + 4]
    assert take(IterationSampler(10, 2, 2, 1, seed=5, start_iter=3), 8) == r1[6:]  # resumed on 2 processes


def test_voc_records_are_zero_based_and_flips_mirror_the_boxes(tmp_path):
    voc = make_voc_detection(str(tmp_path), 3, 1, size=64)
    info = load_dataset("voc_2007_trainval", voc)
    r = info.records[0]  # image 0: a dog, and a small difficult cat
    assert [info.classes[c - 1] for c in r.labels] == ["dog", "cat"] and r.difficult.tolist() == [False, True]
    with open(os.path.join(voc, "VOC2007", "Annotations", "000000.xml")) as f:
        xml = f.read()
    xmin, ymin, xmax, ymax = (float(xml.split(f"<{t}>")[1].split("<")[0]) for t in ("xmin", "ymin", "xmax", "ymax"))
    assert r.boxes[0].tolist() == [xmin - 1, ymin - 1, xmax, ymax]  # Detectron2: 1-based xmin/ymin - 1
    ds = DetectionDataset(info.records, train=True, seed=0)
    flips = []
    for epoch in range(8):
        img, target, _ = ds[(0, epoch)]
        flipped = not torch.equal(target["boxes"], torch.from_numpy(r.boxes))
        flips.append(flipped)
        if flipped:
            assert torch.allclose(target["boxes"][:, [2, 0]], 64 - torch.from_numpy(r.boxes)[:, [0, 2]])
            assert torch.equal(img, DetectionDataset(info.records)[0][0].flip(-1))
    assert any(flips) and not all(flips) and [ds[(0, e)][1]["boxes"].sum() for e in range(8)] == \
        [ds[(0, e)][1]["boxes"].sum() for e in range(8)]  # seeded per (image, epoch)
    with open(info.records[1].path, "wb") as f:  # a corrupt file: skipped, not fatal
        f.write(b"not a jpeg")
    assert ds[(1, 0)][2] == 2 and ds[(1, 1)][2] == 2 and ds.num_skipped == 1  # flagged once, the next image instead
    assert DetectionDataset(info.records)[1][1] == {"unreadable": True}


def test_stop_signal_checkpoints_and_the_same_command_resumes(work, monkeypatch):
    """SIGUSR1 during iteration 1 (polled every iteration): model_interrupted.pth at iteration 2 and
    no evaluation; the same command again resumes there and ends with the uninterrupted run's weights."""
    import signal

    root, first = work
    cmd = FLAGS + ["--stop_check_every", "1"] + SEED_CMD + SMALL + ["OUTPUT_DIR", "out_sig"]
    calls = []
    to_device = T.to_device

    def to_device_and_signal(*a, **kw):   # called once per training iteration
        calls.append(len(calls))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return to_device(*a, **kw)
    monkeypatch.setattr(T, "to_device", to_device_and_signal)
    assert TV.main(cmd) is None
    out = root / "out_sig"
    assert torch.load(out / "model_interrupted.pth", weights_only=True)["iteration"] == 2
    assert (out / "last_checkpoint").read_text() == "model_interrupted.pth" and not (out / "model_final.pth").exists()
    monkeypatch.setattr(T, "to_device", to_device)
    res = TV.main(cmd)
    log = [r for r in jsonl(out / "log.jsonl") if "loss" in r]
    assert [r["iter"] for r in log] == [0, 1, 2, 3, 4, 5] and calls == [0, 1]
    a = torch.load(root / "out1" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert res["voc_2007_test"]["AP"] == pytest.approx(first["voc_2007_test"]["AP"], abs=1e-6)
