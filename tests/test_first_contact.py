"""First contact (issue 17): help text, start-up warnings, the fp16 notice, the docs' checkpoint rule."""
from __future__ import annotations

import glob
import importlib
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "main_*.py")) +
                 glob.glob(os.path.join(ROOT, "eval_*.py")))
LR_FLAG = re.compile(r"(^|[-_])(lr|learning[-_]rate)($|[-_])")


def help_text(script: str) -> str:
    """The ``--help`` output: in process from ``get_parser()`` when the script has one, else run."""
    mod = importlib.import_module(script)
    if hasattr(mod, "get_parser"):
        return mod.get_parser().format_help()
    r = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def help_entries(text: str) -> dict[str, str]:
    """Option strings (e.g. ``-b, --batch-size BATCH_SIZE``) → their help text, from the formatted help."""
    entries, cur = {}, None
    body = text.split("\n\n", 1)[1]                      # after the usage block
    for line in body.splitlines():
        m = re.match(r"^  (-\S.*?|[a-z]\w*)(?:  +(.*))?$", line)
        if m and not line.startswith("   "):
            cur = m.group(1).strip()
            entries[cur] = (m.group(2) or "")
        elif cur is not None and line.startswith("   "):
            entries[cur] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            cur = None
    return entries


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_each_default_once_and_the_batch_and_lr_meaning(script):
    entries = help_entries(help_text(script))
    assert len(entries) > 10
    problems = []
    for opts, h in entries.items():
        if opts.startswith("-h, --help"):
            continue
        positional_required = not opts.startswith("-") and "(default" not in h
        n = h.count("(default")
        if n != 1 and not positional_required:
            problems.append(f"{opts}: {n} defaults in {h!r}")
        names = [o.split()[0] for o in opts.split(", ")]
        if any("batch" in o for o in names) and not re.search(r"per process|per node|global|per-process", h, re.I):
            problems.append(f"{opts}: batch flag without per process / per node / global: {h!r}")
        if any(LR_FLAG.search(o.lstrip("-")) for o in names) and "scaled" not in h:
            problems.append(f"{opts}: lr flag without 'scaled'/'not scaled': {h!r}")
        if "knn_freq" in opts or opts.split()[0] in ("DIR", "data"):
            pass
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_where_val_is_looked_for(script):
    text = " ".join(help_text(script).split())
    if script == "eval_svm_voc":  # VOC07 has no val/ folder: the help must name the split files instead
        assert "ImageSets/Main" in text and "no val/" in text
        return
    assert re.search(r"(DIR|<--data(_path)?>|<--data_path>/\.\.|<data>)/val", text), script


# ----------------------------------------------------------------------------- start-up warnings
WARN = "unusual setting: "
SOGCLR_SEED = ("--lr=.075 --epochs=800 --batch-size=16 --learning-rate-scaling=sqrt --loss_type dcl --gamma 0.9 "
               "--multiprocessing-distributed --world-size 1 --rank 0 --workers 0 --crop-min=.08 --wd=1e-6 "
               "--dist-url tcp://localhost:10001 --data_name imagenet1000 --print-freq 1000 "
               "-a resnet18 --image_size 32 --dim 16 --mlp-dim 64")
MOCO_SEED = ("-a resnet18 --batch-size 8 --learning-rate 0.03 --mlp --moco-t 0.2 --aug-plus --cos --epochs 200 "
             "--dist-url tcp://localhost:10001 --multiprocessing-distributed --world-size 1 --rank 0 --hidden 1280 "
             "--moco-k 64 --image_size 32 -j 0")
CACO_SEED = ("--type=0 --lr=0.3 --lr_final=0.003 --memory_lr=3.0 --memory_lr_final=3.0 --cluster=16 --moco_t=0.08 "
             "--mem_t=0.08 --dist_url=tcp://localhost:10001 --batch_size=16 --wd=1.5e-6 --mem_wd=0 --moco_dim=16 "
             "--moco_m=0.99 --moco_m_decay=1 --mlp_dim=16 --epochs=200 --warmup_epochs=10 --nodes_num=1 --workers=0 "
             "--world_size 1 --rank=0 --mem_momentum=0.9 --ad_init=1 --knn_batch_size=16 --multi_crop=0 --knn_freq=10 "
             "-a resnet18 --image_size 32")
MOCOM_SEED = ("--nmb_crops 3 2 --size_crops 32 16 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14 "
              "--crops_for_assign 0 1 --moco-dim 16 --moco-k 16 --moco-m 0.999 --temperature 0.2 --mlp true "
              "--epochs 200 --batch_size 4 --base_lr 1.8 --final_lr 0.018 --wd 1e-6 --warmup_epochs 0 "
              "--checkpoint_freq 1 --dist_url tcp://localhost:40000 --arch mocom_r18 --use_fp16 true --sync_bn pytorch "
              "--workers 0")


@pytest.fixture
def no_training(monkeypatch):
    """Everything up to ``Trainer.fit`` (data, model, the start-up checks) runs; the training does not."""
    monkeypatch.setattr("src.engine.loop.Trainer.fit", lambda self: None)


def _start(script: str, argv: list[str], capsys) -> str:
    """Run ``script.main(argv)`` without training; its rank-0 console log."""
    mod = importlib.import_module(script)
    capsys.readouterr()
    mod.main(argv)
    return capsys.readouterr().out


def _warnings(out: str) -> list[str]:
    return [line.split(WARN, 1)[1] for line in out.splitlines() if WARN in line]


@pytest.mark.parametrize("script,argv", [
    ("main_sogclr", SOGCLR_SEED + " --data {root} --output_dir {out}"),
    ("main_moco", MOCO_SEED + " --output_dir {out} --knn_freq 1 {root}"),
    ("main_caco", CACO_SEED + " --data={root} --output_dir {out}"),
    ("main_moco_m", MOCOM_SEED + " --data_path {root}/train --dump_path {out} --knn_freq 1 --image_size 32"),
    ("main_lorac", MOCOM_SEED + " --data_path {root}/train --dump_path {out} --lorac_beta 15. --epoch_lorac_starts 100"),
    ("eval_knn", "-a resnet18 --nb_knn 20 --image_size 32 -j 0 {root}"),
])
def test_seed_commands_raise_no_warning(script, argv, tiny_folder, tmp_path, capsys, no_training, monkeypatch):
    """The official commands (sizes changed to the 32-px test images, epochs and warm-up kept)."""
    import eval_knn
    monkeypatch.setattr(eval_knn, "extract_features", _stop)
    with pytest.raises(_Stopped) if script == "eval_knn" else _nothing():
        out = _start(script, argv.format(root=tiny_folder, out=tmp_path).split(), capsys)
    if script == "eval_knn":
        out = capsys.readouterr().out
    assert "Building" in out or "processes" in out or "bank" in out   # the start-up log was captured
    assert _warnings(out) == []


class _Stopped(Exception):
    pass


def _stop(*a, **k):
    raise _Stopped


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_warmup_of_half_the_epochs_warns(tiny_folder, tmp_path, capsys, no_training):
    out = _start("main_sogclr", (SOGCLR_SEED.replace("--epochs=800", "--epochs=20") +
                                 f" --warmup-epochs 10 --data {tiny_folder} --output_dir {tmp_path}").split(), capsys)
    assert _warnings(out) == ["--warmup-epochs 10 is at least half of --epochs 20: most of the run is spent "
                              "warming up the lr"]
    out = _start("main_moco_m", (MOCOM_SEED.replace("--epochs 200", "--epochs 6").replace("--warmup_epochs 0", "--warmup_epochs 3") +
                                 f" --data_path {tiny_folder}/train --dump_path {tmp_path}/m").split(), capsys)
    assert [w.split(":")[0] for w in _warnings(out)] == ["--warmup_epochs 3 is at least half of --epochs 6"]


def test_sogclr_default_lr_with_sqrt_scaling_warns(tiny_folder, tmp_path, capsys, no_training):
    """argparse default 0.6 (MoCo v3's, meant for linear scaling) x sqrt(16) = 2.4 vs 0.075 x sqrt(16) = 0.3."""
    out = _start("main_sogclr", (SOGCLR_SEED.replace("--lr=.075 ", "") +
                                 f" --data {tiny_folder} --output_dir {tmp_path}").split(), capsys)
    (w,) = _warnings(out)
    assert w.startswith("effective lr 2.4 (--lr 0.6 x sqrt(global batch 16)) is 8x the documented recipe 0.3")


def test_caco_default_lr_warns(tiny_folder, tmp_path, capsys, no_training):
    out = _start("main_caco", (CACO_SEED.replace("--lr=0.3 ", "") + f" --data={tiny_folder} --output_dir {tmp_path}").split(),
                 capsys)
    (w,) = _warnings(out)
    assert w.startswith("effective lr 0.001875 (--lr 0.03 x 16/256) is 0.1x the documented recipe 0.01875")


def test_image_size_larger_than_the_images_warns_for_training_knn_and_eval_knn(tiny_folder, tmp_path, capsys,
                                                                             no_training, monkeypatch):
    out = _start("main_moco", (MOCO_SEED.replace("--image_size 32", "--knn_freq 1") +
                               f" --output_dir {tmp_path} {tiny_folder}").split(), capsys)
    assert _warnings(out) == [
        "--image_size 224 is 7x the images on disk (training crops: shorter side about 32 px in 8 sampled): they "
        "are silently upsampled; pass e.g. --image_size 32",
        "--image_size 224 is 7x the images on disk (kNN monitor bank: shorter side about 32 px in 8 sampled): they "
        "are silently upsampled; pass e.g. --image_size 32"]
    out = _start("main_lorac", (MOCOM_SEED.replace("--size_crops 32 16", "--size_crops 224 96") +
                                f" --data_path {tiny_folder}/train --dump_path {tmp_path}/l").split(), capsys)
    assert [w.split(" is ")[0] for w in _warnings(out)] == ["--size_crops 224"]
    import eval_knn
    monkeypatch.setattr(eval_knn, "extract_features", _stop)
    with pytest.raises(_Stopped):
        _start("eval_knn", ["-a", "resnet18", "--image_size", "96", "-j", "0", tiny_folder], capsys)
    assert [w.split(" (")[0] for w in _warnings(capsys.readouterr().out)] == [
        "--image_size 96 is 3x the images on disk"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the notice is for CPU runs")
def test_fp16_notice_once_and_requested_only_when_given(tiny_folder, tmp_path, capsys, no_training):
    base = SOGCLR_SEED + f" --data {tiny_folder} --output_dir {tmp_path}"
    out = _start("main_sogclr", base.split(), capsys)
    notes = [line for line in out.splitlines() if "fp16" in line]
    assert len(notes) == 1 and "on by default" in notes[0] and "requested" not in notes[0]
    for flag in (["--use_fp16", "true"], ["--use-fp16"], ["--use_fp16=1"]):
        out = _start("main_sogclr", base.split() + flag, capsys)
        notes = [line for line in out.splitlines() if "fp16" in line]
        assert len(notes) == 1 and "--use_fp16 requested" in notes[0], flag
    out = _start("main_sogclr", base.split() + ["--use_fp16", "false"], capsys)
    assert "fp16" not in out


# ----------------------------------------------------------------------------- docs vs code
def _last_epochs_kept(should_save, epochs: int) -> int:
    """How many final epochs are kept beyond the every-10th rule."""
    return sum(should_save(e, epochs) and e % 10 != 0 for e in range(epochs - 10, epochs))


def test_docs_checkpoint_rule_matches_the_code():
    import main_sogclr
    n = _last_epochs_kept(main_sogclr.should_save, 800)
    assert n == _last_epochs_kept(main_sogclr.should_save, 100) == 2     # official ``epochs - epoch < 3``
    texts = {"README.md": open(os.path.join(ROOT, "README.md")).read(),
             "docs/sogclr.md": open(os.path.join(ROOT, "docs", "sogclr.md")).read(),
             "main_sogclr.py": main_sogclr.__doc__}
    for name, text in texts.items():
        said = re.findall(r"last (\d+|two|three) epochs", " ".join(text.split()))
        assert said, name
        assert all({"two": "2", "three": "3"}.get(s, s) == str(n) for s in said), (name, said)


def test_docs_explain_the_falling_training_accuracy():
    for doc in ("README.md", "docs/mocom_lorac.md"):
        text = " ".join(open(os.path.join(ROOT, doc)).read().split())
        assert re.search(r"acc1.{0,200}falls? towards 0.{0,200}queue", text), doc


# ----------------------------------------------------------------------------- --hidden_mlp
@pytest.mark.parametrize("script", ["main_moco_m", "main_lorac"])
def test_hidden_mlp_other_than_default_is_refused_with_one_line(script, tiny_folder, tmp_path, capsys, no_training):
    argv = (MOCOM_SEED + f" --data_path {tiny_folder}/train --dump_path {tmp_path}").split()
    _start(script, argv + ["--hidden_mlp", "2048"], capsys)        # the official default is accepted
    mod = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        mod.main(argv + ["--hidden_mlp", "4096"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--hidden_mlp 4096" in err[0] and "feature dim" in err[0]
    help_ = " ".join(mod.get_parser().format_help().split())
    assert "hidden width is always the backbone's feature dim" in help_
