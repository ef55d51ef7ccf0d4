"""Flag fuzzing (issue 14): every entry script gets random combinations of its own flags, with random
(often invalid) values, from a fixed seed per script. Each run must exit 0 or exit 2 with one line of
error: never a traceback.

- ``test_random_flag_combinations_pass_or_fail_in_one_line``: every script. Where the work starts
  (``D.launch``, eval_svm_voc's ``run``) a recorder stands in, so what is checked is everything up to
  it; the scripts without such a point (checkpoint conversion and export, plots, subset builders, the
  zoo's ``list``) run for real on tiny inputs, inside the test's directory.
- ``test_sampled_modes_train_one_iteration``: for every training script, a few random combinations of
  its mode flags (switches, choices, booleans) on top of a tiny command really train one iteration
  (``main_worker`` in-process): exit 0 with a checkpoint written, or one line.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import random
import zlib

import pytest
import torch

import src.distributed as D

INTS = ["-3", "0", "1", "2", "7", "100000000"]
FLOATS = ["-1", "0", "1e-9", "0.5", "3", "nan", "1e12"]
STRS = ["", "x", "/nonexistent/file.pth", "0,1", "resnet18", "true", "-1"]
SKIP = {"-h", "--help", "--dist-url", "--dist_url", "--world-size", "--world_size", "--rank", "--nproc",
        "--multiprocessing-distributed", "--multiprocessing_distributed", "--local_rank", "--local-rank",
        "--dist-backend", "--dist_backend", "--output_dir", "--output-dir", "--dump_path", "--exp-dir",
        "--exp_dir", "--save_dir", "--cache_dir", "--data", "--data_path", "--data-path"}
TRAINING = ["main_moco", "main_moco_m", "main_lorac", "main_sogclr", "main_caco", "main_disco", "main_swav",
            "main_swav_distill", "main_pcl"]
#: script → its base argv ({data} {out} {ck} {run} filled in); absent: the data flag and output dir it has
BASES = {
    "detection.convert_to_detectron2": "{ck} {out}/model.pkl",
    "eval_svm_voc": "{data} --output_dir {out}",
    "scripts.visualize_embeddings": "{data} --out {out}/emb",
    "scripts.plot_training": "{run} --output {out}/curves.png",
    "scripts.export_backbone": "--pretrained {ck} -a resnet18 --output {out}/bb.pth",
    "scripts.make_imagenet_subset": "--src {imagenet} --dst {out}/subset --num_classes 1",
    "scripts.make_imagenet_fraction": "--src {imagenet} --dst {out}/fraction --split_file {split}",
    "scripts.zoo": "",
}
#: added to the generic base: what the script cannot start without
EXTRA = {"main_disco": "--teacher {ck}", "main_swav_distill": "--pretrained {ck}", "eval_linear": "--pretrained {ck}",
         "eval_knn": "--pretrained {ck}", "eval_semi": "--pretrained {ck}"}
SCRIPTS = [*TRAINING, "eval_linear", "eval_knn", "eval_semi", "detection.train_torchvision", *BASES]
WORK = {"eval_svm_voc": "run"}   # the work function replaced by the recorder, besides D.launch
REAL = {s for s in BASES if s not in WORK and s != "scripts.visualize_embeddings"}   # no recorder: real runs
TRIALS = 12


def seeded(script: str) -> random.Random:
    return random.Random(zlib.crc32(script.encode()))   # the same draws in every process (hash() is salted)


def _value(action: argparse.Action, rng: random.Random) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        pool = [str(c) for c in action.choices] + ["not-a-choice"]
    elif action.type is int:
        pool = INTS
    elif action.type is float:
        pool = FLOATS
    else:
        pool = STRS + INTS[:2]
    n = rng.choice([1, 2]) if action.nargs in ("+", "*") else 1
    return [rng.choice(pool) for _ in range(n)]


def _base(script: str, parser: argparse.ArgumentParser, data: str, out: str) -> list[str]:
    opts = {o for a in parser._actions for o in a.option_strings}
    base = []
    for flag in ("--output_dir", "--dump_path", "--exp-dir"):
        if flag in opts:
            base += [flag, out]
            break
    if "--data_path" in opts:
        base += ["--data_path", os.path.join(data, "train") if script.startswith("main_") else data]
    elif any(not a.option_strings and a.dest in ("data", "DIR") for a in parser._actions):
        base += [data]
    elif "--data" in opts:
        base += ["--data", data]
    return base


class _Parsed(Exception):
    pass


def parser_of(mod, monkeypatch) -> argparse.ArgumentParser:
    """``mod.get_parser()``, or the parser ``mod.main`` builds (caught at its ``parse_args``)."""
    if hasattr(mod, "get_parser"):
        return mod.get_parser()
    got = []

    def grab(self, *a, **kw):
        got.append(self)
        raise _Parsed
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(_Parsed):
            mod.main([])
    return got[0]


def _subcommand(parser: argparse.ArgumentParser, rng: random.Random) -> tuple[list[str], argparse.ArgumentParser]:
    """A parser with sub-commands (the zoo's list / download): one of them and its random positionals."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [], parser
    name = rng.choice(sorted(subs[0].choices))
    sub = subs[0].choices[name]
    pos = [v for a in sub._actions if not a.option_strings for v in _value(a, rng)]
    return [name, *pos], sub


@pytest.fixture(scope="module")
def inputs(tiny_folder, tmp_path_factory) -> dict[str, str]:
    """A resnet18 checkpoint (MoCo layout), a run directory with a log.jsonl, and an ImageNet-named folder
    (``train|val/<wnid>/<wnid>_<n>.JPEG``) with a SimCLR-style split file."""
    from PIL import Image

    from src.models.backbones import build_encoder
    d = tmp_path_factory.mktemp("fuzz_inputs")
    torch.manual_seed(0)
    enc = build_encoder("resnet18", torch.nn.Linear(512, 16))
    ck = str(d / "checkpoint_0000.pth.tar")
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()},
                "arch": "resnet18", "epoch": 1}, ck)
    run = d / "run"
    run.mkdir()
    rows = [{"epoch": e, "iter": i, "loss": 5.0 - e - 0.1 * i, "lr": 0.1} for e in range(2) for i in range(3)]
    rows += [{"epoch": e, "loss": 4.5 - e, "epoch_time_s": 1.0} for e in range(2)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (d / "imagenet" / split / wnid).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 90, 160)).save(d / "imagenet" / split / wnid / f"{wnid}_{i}.JPEG")
    (d / "1percent.txt").write_text("n01440764_0.JPEG\nn01443537_1.JPEG\n")
    return {"data": tiny_folder, "ck": ck, "run": str(run), "imagenet": str(d / "imagenet"),
            "split": str(d / "1percent.txt")}


def _one_line_or_ok(mod, argv: list[str], capsys) -> bool:
    """True when ``mod.main(argv)`` returned; False when it exited 2 with one error line."""
    try:
        mod.main(argv)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2, (argv, err)
        assert "Traceback" not in err, (argv, err)
        assert sum("error" in line for line in err.strip().splitlines()) == 1, (argv, err)
        return False
    capsys.readouterr()
    return True


@pytest.mark.parametrize("script", SCRIPTS)
def test_random_flag_combinations_pass_or_fail_in_one_line(script, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                              # relative output paths land here
    monkeypatch.setenv("SSL_CACHE", str(tmp_path / "cache"))  # the zoo's cache
    launched = []
    monkeypatch.setattr(D, "launch", lambda fn, args: launched.append(args))
    mod = importlib.import_module(script)
    if script in WORK:
        monkeypatch.setattr(mod, WORK[script], lambda args: launched.append(args) or {})
    parser = parser_of(mod, monkeypatch)
    rng = seeded(script)
    outcomes = {"ok": 0, "refused": 0}
    for trial in range(TRIALS):
        out = str(tmp_path / f"out{trial}")
        if script in BASES:
            os.makedirs(out, exist_ok=True)
            argv = BASES[script].format(out=out, **inputs).split()
        else:
            argv = _base(script, parser, inputs["data"], out) + EXTRA.get(script, "").format(**inputs).split()
        head, sub = _subcommand(parser, rng)
        flags = [a for a in sub._actions if a.option_strings and not set(a.option_strings) & SKIP]
        argv = head + argv
        for a in rng.sample(flags, k=min(len(flags), rng.randint(1, 4))):
            argv += [rng.choice(a.option_strings), *_value(a, rng)]
        n = len(launched)
        if _one_line_or_ok(mod, argv, capsys):
            outcomes["ok"] += 1
            if script not in REAL:
                assert len(launched) == n + 1, argv        # passed the checks: reached the work
        else:
            outcomes["refused"] += 1
    assert outcomes["ok"] + outcomes["refused"] == TRIALS


# ----------------------------------------------------------------------------- one real iteration
MOCO = "-a resnet18 -b 4 --moco-k 16 --moco-dim 16 -j 0 --image_size 32"
MULTICROP = ("--arch resnet18 --batch_size 4 --workers 0 --nmb_crops 2 1 --size_crops 32 16 --min_scale_crops 0.14 "
             "0.05 --max_scale_crops 1. 0.14 --crops_for_assign 0 1")
SWAV = MULTICROP + " --feat_dim 16 --nmb_prototypes 10 --hidden_mlp 32 --queue_length 0"
TINY = {   # script → tiny command ({data} {out} {moco} {swav}: the teachers); the data dir comes last
    "main_moco": f"{MOCO} --output_dir {{out}} {{data}}",
    "main_pcl": "-a resnet18 -b 4 -j 0 --image_size 32 --pcl-r 4 --low-dim 16 --num-cluster 10 --warmup-epoch 0 "
                "--output_dir {out} {data}",
    "main_disco": "-a resnet18 -b 4 --moco-k 16 --moco-dim 16 -j 0 --image_size 32 --hidden 32 --teacher_arch "
                  "resnet18 --teacher {moco} --output_dir {out} {data}",
    "main_sogclr": "-a resnet18 -b 4 --dim 16 --mlp-dim 32 --workers 0 --image_size 32 --output_dir {out} "
                   "--data {data}",
    "main_caco": "-a resnet18 --batch_size 4 --cluster 8 --moco_dim 16 --mlp_dim 32 --workers 0 --image_size 32 "
                 "--ad_init 0 --output_dir {out} --data {data}",
    "main_moco_m": f"{MULTICROP} --moco-dim 16 --moco-k 16 --output_dir {{out}} --data_path {{data}}/train",
    "main_lorac": f"{MULTICROP} --moco-dim 16 --moco-k 16 --epoch_lorac_starts 0 --output_dir {{out}} "
                  "--data_path {data}/train",
    "main_swav": f"{SWAV} --output_dir {{out}} --data_path {{data}}/train",
    "main_swav_distill": f"{SWAV} --pretrained {{swav}} --output_dir {{out}} --data_path {{data}}/train",
}
RUNS = 2
#: not sampled here: they need CIFAR / STL-10 files (tests/test_small_e2e.py runs them)
NEEDS_OTHER_DATA = {"--dataset", "--data_on_device"}


def _mode_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Switches, choices and booleans: the flags that select a mode, whose every value is cheap."""
    return [a for a in parser._actions if a.option_strings and not set(a.option_strings) & (SKIP | NEEDS_OTHER_DATA)
            and (a.nargs == 0 or a.choices or a.type is D.str2bool)]


def _mode_value(action: argparse.Action, rng: random.Random) -> list[str]:
    if action.nargs == 0:
        return []
    pool = [str(c) for c in action.choices] if action.choices else ["true", "false"]
    return [rng.choice(pool)]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    from src.models.backbones import build_encoder
    from src.models.heads import moco_head
    from src.models.teacher import build_teacher
    d = tmp_path_factory.mktemp("fuzz_teachers")
    torch.manual_seed(0)
    enc = build_encoder("resnet18", moco_head(512, 16, True, -1))
    moco = str(d / "moco_r18.pth.tar")
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}}, moco)
    swav = str(d / "swav_800ep_pretrain.pth.tar")
    torch.save({f"module.{k}": v for k, v in build_teacher("SWAVresnet50", dim=16).state_dict().items()}, swav)
    return {"moco": moco, "swav": swav}


@pytest.mark.parametrize("script", TRAINING)
def test_sampled_modes_train_one_iteration(script, tiny_folder, teachers, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mod = importlib.import_module(script)
    modes = _mode_flags(mod.get_parser())
    rng = seeded("run:" + script)
    trained = 0
    for trial in range(RUNS):
        out = str(tmp_path / f"out{trial}")
        argv = []
        for a in rng.sample(modes, k=min(len(modes), 3)):
            argv += [rng.choice(a.option_strings), *_mode_value(a, rng)]
        tiny = TINY[script].format(out=out, data=tiny_folder, **teachers).split()
        argv += ["--epochs", "1", "--max_iters", "1", "--knn_freq", "0", *tiny]
        if _one_line_or_ok(mod, argv, capsys):
            assert glob.glob(os.path.join(out, "*.pth.tar")), argv   # it trained and checkpointed
            trained += 1
    assert trained, f"{script}: every sampled combination was refused"
