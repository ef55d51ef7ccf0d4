"""main_disco.py end to end: a ResNet-18 teacher trained by main_moco.py, an EfficientNet-B0 student on
2 processes (the seed's MoCo-style launch), resumed once, a changed teacher refused, then the student's
linear evaluation; the seed commands' flags; official DisCo checkpoints in the evaluation tools."""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys

import pytest
import torch

from src.checkpoint import load_backbone, load_checkpoint

# DisCo seed commands (shared/seeds/003_*.txt); only the script name, paths and sizes change
DISCO_R50 = ("-a efficientb0 --lr 0.03 --batch-size 256 --moco-t 0.2 --aug-plus --dist-url 'tcp://localhost:10043' "
             "--multiprocessing-distributed --world-size 1 --rank 0 --mlp --cos --teacher_arch resnet50 "
             "--teacher /path/to/ckpt/checkpoint_0199.pth.tar /dev/shm/")
SEED_COMMANDS = [
    DISCO_R50,
    "-a efficientb0 --lr 0.03 --batch-size 256 --moco-t 0.2 --aug-plus --dist-url 'tcp://localhost:10043' "
    "--multiprocessing-distributed --world-size 1 --rank 0 --mlp --cos --teacher_arch resnet50w2 "
    "--teacher /path/to/swav_RN50w2_400ep_pretrain.pth.tar /dev/shm",
    "-a resnet34 --lr 0.03 --batch-size 256 --moco-t 0.2 --aug-plus --dist-url 'tcp://localhost:10043' "
    "--multiprocessing-distributed --world-size 1 --rank 0 --mlp --cos --teacher_arch SWAVresnet50 "
    "--teacher /path/to/swav_800ep_pretrain.pth.tar /dev/shm",
    DISCO_R50.replace("/dev/shm/", "--hidden 2048 /dev/shm/"),  # Tab4
    # main_moco_distill_rkd.py (RKD+DisCo, RKD)
    "--distill rkd -a efficientb0 --lr 0.03 --batch-size 256 --moco-t 0.2 --aug-plus --dist-url 'tcp://localhost:10043' "
    "--multiprocessing-distributed --world-size 1 --rank 0 --mlp --cos --teacher /path/to/teacher_res50.pth.tar --use-mse /dev/shm",
    "--distill rkd -a efficientb0 --lr 0.03 --batch-size 256 --moco-t 0.2 --aug-plus --dist-url 'tcp://localhost:10043' "
    "--multiprocessing-distributed --world-size 1 --rank 0 --mlp --cos --teacher /path/to/teacher_res50.pth.tar /dev/shm",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed(cmd: str, data: str, teacher: str | None = None, port: int | None = None) -> list[str]:
    argv = [a for a in shlex.split(cmd) if not a.startswith("/dev/shm")]
    if teacher:
        argv[argv.index("--teacher") + 1] = teacher
    if port:
        argv[argv.index("--dist-url") + 1] = f"tcp://127.0.0.1:{port}"
    return argv + [data]


@pytest.mark.parametrize("cmd", SEED_COMMANDS, ids=range(len(SEED_COMMANDS)))
def test_seed_commands_parse(cmd, tiny_folder):
    import main_disco
    args = main_disco.get_parser().parse_args(_seed(cmd, tiny_folder))
    assert args.lr == 0.03 and args.mlp and args.cos and args.aug_plus and args.moco_t == 0.2
    assert args.hidden == 2048 and args.multiprocessing_distributed and args.distill_reduction == "sum"
    assert args.distill == ("rkd" if "rkd" in cmd else "mse") and args.use_mse == ("--use-mse" in cmd)
    with pytest.raises(Exception, match="--teacher checkpoint not found"):
        main_disco.check_args(args)


def _run(argv, cwd, ok=True, timeout=400):
    # one intra-op thread per process: on a loaded 2-core machine OpenMP spinning makes steps ~50x slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


SMALL = ["--batch-size", "8", "--moco-k", "64", "--image_size", "32", "-j", "0", "--print-freq", "1"]


@pytest.fixture(scope="module")
def r18_teacher(tiny_folder, tmp_path_factory) -> str:
    """A ResNet-18 MoCo v2 teacher from main_moco.py (DisCo baseline command, 1 iteration)."""
    out = tmp_path_factory.mktemp("teacher")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _run(["main_moco.py", "-a", "resnet18", "--learning-rate", "0.03", "--mlp", "--moco-t", "0.2", "--aug-plus",
          "--cos", "--epochs", "1", "--hidden", "512", *SMALL, "--max_iters", "1", "--output_dir", str(out),
          tiny_folder], root)
    return str(out / "checkpoint_0000.pth.tar")


@pytest.mark.slow
def test_disco_two_processes_resume_and_linear_eval(tiny_folder, r18_teacher, tmp_path, repo_root):
    out = tmp_path / "disco"
    cmd = _seed(DISCO_R50.replace("resnet50", "resnet18"), tiny_folder, r18_teacher, _port())
    base = ["main_disco.py", *cmd, *SMALL, "--nproc", "2", "--max_iters", "2", "--output_dir", str(out)]
    _run(base + ["--epochs", "1"], repo_root)
    r = _run(base + ["--epochs", "2"], repo_root)  # resumes from checkpoint_0000
    log = (out / "logs" / "train.log").read_text()
    assert "resumed from" in r.stdout + r.stderr + log and "processes 2" in log
    assert "deliberately not loaded: module.encoder_k.* (124 keys), module.queue, module.queue_ptr" in log
    ck = load_checkpoint(str(out / "checkpoint_0001.pth.tar"))
    sd = ck["state_dict"]
    assert ck["epoch"] == 2 and ck["arch"] == "efficientb0"
    assert not any("teacher" in k for k in sd)  # the teacher is not saved by default
    assert ck["teacher_info"]["sha256"] == __import__("src.models.teacher", fromlist=["x"]).file_sha256(r18_teacher)
    assert ck["teacher_info"]["arch"] == "resnet18"
    assert sd["module.encoder_q.classifier.0.weight"].shape == (2048, 1280)
    # 2 epochs × 2 iterations × 8 keys (2 processes × 4); the teacher's queue was not copied
    assert int(sd["module.queue_ptr"]) == 32
    tq = load_checkpoint(r18_teacher)["state_dict"]["module.queue"]
    assert not torch.equal(sd["module.queue"][:, 32:], tq[:, 32:])
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    rows = [x for x in lines if "loss_distill" in x]
    # InfoNCE + 1.0 x the summed squared distance, in every window and epoch line
    assert rows and all(x["loss"] == pytest.approx(x["loss_moco"] + x["loss_distill"], rel=1e-5) for x in rows)
    # a changed teacher file is refused on resume (one line, exit 2)
    changed = tmp_path / "teacher2.pth.tar"
    t = load_checkpoint(r18_teacher)
    t["state_dict"]["module.encoder_q.fc.2.bias"] += 1
    torch.save(t, changed)
    bad = [a if a != r18_teacher else str(changed) for a in base] + ["--epochs", "3"]
    r = _run(bad, repo_root, ok=False)
    assert r.returncode == 2 and "teacher file changed" in r.stderr and "Traceback" not in r.stderr
    # linear evaluation of the student (DisCo main_lincls.py command, sizes changed)
    ck1 = str(out / "checkpoint_0001.pth.tar")
    r = _run(["eval_linear.py", "-a", "efficientb0", "--learning-rate", "3.0", "--batch-size", "8", "--pretrained",
              ck1, "--image_size", "32", "-j", "0", "--epochs", "1", "--max_iters", "2",
              "--dump_path", str(tmp_path / "lin"), tiny_folder], repo_root)
    res = json.loads((tmp_path / "lin" / "results.json").read_text())
    assert res["protocol"] == "disco" and res["lr"] == 3.0
    from tests import recompute
    head = torch.load(str(tmp_path / "lin" / "checkpoint.pth.tar"), weights_only=False)["state_dict"]
    top1 = recompute.linear_top1(load_backbone(ck1, "efficientb0"), head, recompute.image_split(tiny_folder, "val"))
    assert res["best_acc1"] == res["last_acc1"] == pytest.approx(top1, abs=1e-4)   # one epoch


def test_official_disco_checkpoint_loads_in_eval_and_export(tmp_path, repo_root):
    """An official DisCo checkpoint holds the student and both teacher copies (``teacher_encoder_q/k``)."""
    from src.methods.moco import MoCo
    torch.manual_seed(0)
    student = MoCo("resnet18", 128, 64, mlp=True, hidden=2048)
    teacher = MoCo("resnet34", 128, 64, mlp=True, hidden=512)
    sd = {f"module.{k}": v for k, v in student.state_dict().items()}
    for k, v in teacher.encoder_q.state_dict().items():
        sd[f"module.teacher_encoder_q.{k}"] = v
        sd[f"module.teacher_encoder_k.{k}"] = v
    p = tmp_path / "checkpoint_0199.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, p)
    bb = load_backbone(str(p), "resnet18")
    assert bb.loaded_prefix == "module.encoder_q."
    assert torch.equal(bb.state_dict()["layer4.1.bn2.weight"], sd["module.encoder_q.layer4.1.bn2.weight"])
    sys.path.insert(0, os.path.join(repo_root, "scripts"))
    import export_backbone
    export_backbone.main(["--pretrained", str(p), "-a", "resnet18", "--output", str(tmp_path / "r18.pth")])
    ex = torch.load(tmp_path / "r18.pth", weights_only=True)
    assert torch.equal(ex["conv1.weight"], sd["module.encoder_q.conv1.weight"]) and "fc.0.weight" not in ex


def test_bad_flags_give_one_line(tiny_folder, r18_teacher, tmp_path):
    import main_disco
    for extra, msg in ((["--teacher_arch", "resnet50w2"], "does not fit --teacher_arch resnet50w2"),
                       (["--nmb_prototypes", "3000"], "--nmb_prototypes must be 0"),
                       (["--use-mse"], "--use-mse adds DisCo's loss to RKD")):
        argv = ["-a", "resnet18", "--teacher", r18_teacher, *SMALL, "--output_dir", str(tmp_path), *extra, tiny_folder]
        if "--teacher_arch" in extra:
            from src.errors import UserError
            from src.models.teacher import load_teacher
            with pytest.raises(UserError, match=msg):
                load_teacher(r18_teacher, "resnet50w2")
            continue
        with pytest.raises(SystemExit) as e:
            main_disco.main(argv)
        assert e.value.code == 2
