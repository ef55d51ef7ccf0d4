"""scripts/benchmark_small.py: a run's log.jsonl into the results table / CSV, lightly's points on the
plot, and end to end (two iterations of MoCo v2, a method that fails, DisCo skipped, a resumed rerun)."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from src import benchmark as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_small", os.path.join(ROOT, "scripts", "benchmark_small.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_log_rows_become_table_csv_and_plot(tmp_path, monkeypatch):
    rows = [{"time": 100.0 + 5, "epoch": 0, "iter": 9, "loss": 5.0},                       # a window row: ignored
            {"time": 110.0, "epoch": 0, "loss": 4.9, "knn_top1": 31.0, "cuda_max_memory_allocated_mb": 1200.0},
            {"time": 130.0, "epoch": 1, "loss": 4.5, "knn_top1": 20.0, "cuda_max_memory_allocated_mb": 1536.0},
            {"time": 150.0, "epoch": 1, "loss": 4.4, "knn_top1": 44.5},                     # epoch 1 again (resumed)
            {"time": 170.0, "epoch": 2, "loss": 4.2, "knn_top1": 40.0}]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"time": 171, "epo')   # a line cut by a kill
    knn, times, mem = B.knn_curve(B.read_log(str(path)), start_time=100.0)
    assert knn == [31.0, 44.5, 40.0] and times == [10.0, 50.0, 70.0] and mem == 1536.0

    ok = B.Result("moco", "ok", "python main_moco.py a|b", "gpu200", 512, 3, "1 x GPU", wall_s=90.0,
                  memory_mb=mem, memory_kind="CUDA max_memory_allocated", knn=knn, knn_time_s=times)
    bad = B.Result("swav", "failed", "python main_swav.py x", "gpu200", 512, 3, "1 x GPU", wall_s=6.0,
                   memory_mb=300.0, memory_kind="peak RSS", note="exit 2; error: boom")
    md = B.write_markdown([ok, bad], str(tmp_path / "r.md"), "t", ["note line"])
    text = Path(md).read_text()
    assert "memory (CUDA max_memory_allocated / peak RSS)" in text
    assert "| MoCo v2 | ResNet-18 (CIFAR stem) | 512 | 3 | 44.50 | 1.5 min | 1.50 GB | 1 x GPU | ok | " \
           "`python main_moco.py a|b` |" in text
    assert "| SwAV |" in text and "failed: exit 2; error: boom" in text and "| — | 0.1 min | 300 MB |" in text
    with open(B.write_csv([ok, bad], str(tmp_path / "r.csv"))) as f:
        got = list(csv.DictReader(f))
    assert got[0]["knn_top1_max"] == "44.500" and got[0]["knn_top1_last"] == "40.000"
    assert got[0]["knn_top1_per_epoch"] == "31.000;44.500;40.000" and got[0]["memory_mb"] == "1536.0"
    assert got[1]["status"] == "failed" and got[1]["knn_top1_max"] == "" and got[1]["note"] == "exit 2; error: boom"

    figs = []
    monkeypatch.setattr(B, "save_figure", lambda fig, p: figs.append(fig) or p)
    B.plot([ok, bad], str(tmp_path / "p.png"), "t")
    ax = figs[0].axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections if len(c.get_offsets())])
    want = np.array([(m, 100 * a) for a, m, _ in B.LIGHTLY_CIFAR10.values()])
    assert sorted(map(tuple, points.round(3))) == sorted(map(tuple, want.round(3)))   # every published point
    (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("MoCo v2")]
    assert np.allclose(line.get_xdata(), [t / 60 for t in times]) and list(line.get_ydata()) == knn


def test_lightly_points_are_the_anchor_table():
    assert B.LIGHTLY_CIFAR10[("MoCo", 512, 200)] == (0.847, 112.2, 5.6)
    assert B.LIGHTLY_CIFAR10[("SwaV", 512, 800)] == (0.884, 330.5, 5.0)
    assert len(B.LIGHTLY_CIFAR10) == 24


@pytest.mark.slow
def test_two_iterations_a_failure_a_skip_and_a_resumed_rerun(tmp_path, monkeypatch, capsys):
    from src.data.procedural import write_procedural_cifar10
    data = write_procedural_cifar10(str(tmp_path / "data"), train_per_class=2, test_per_class=1, num_classes=10)
    out = str(tmp_path / "bench")
    bench = _script()
    monkeypatch.setitem(B.SCRIPTS, "sogclr", "main_sogclr_missing.py")   # a method whose script cannot start
    argv = ["--data", data, "--budget", "cpu", "--epochs", "1", "--max_iters", "2", "--batch", "8", "--workers", "0",
            "--image_size", "8", "--methods", "moco", "sogclr", "disco", "--out", out]
    bench.main(argv)
    printed = capsys.readouterr().out
    assert "[moco] python main_moco.py " in printed and "--knn_protocol lightly" in printed
    assert "[disco] skipped: DisCo distils a frozen teacher" in printed

    with open(os.path.join(out, "results.csv")) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["random", "moco", "sogclr"]
    log = B.read_log(os.path.join(out, "moco", "log.jsonl"))
    (epoch,) = [r for r in log if "knn_top1" in r]
    assert rows["moco"]["status"] == "ok" and float(rows["moco"]["knn_top1_max"]) == pytest.approx(epoch["knn_top1"], abs=1e-3)
    assert max(r["iter"] for r in log if "iter" in r) == 1 and rows["moco"]["epochs"] == "1"   # 2 iterations
    assert rows["moco"]["memory_kind"] == "peak RSS" and float(rows["moco"]["memory_mb"]) > 100
    assert float(rows["moco"]["wall_min"]) > 0 and rows["moco"]["command"].startswith("python main_moco.py ")
    assert rows["random"]["status"] == "ok" and 0 <= float(rows["random"]["knn_top1_max"]) <= 100
    assert rows["sogclr"]["status"] == "failed" and rows["sogclr"]["note"].startswith("exit 2; ")
    assert "main_sogclr_missing.py" in rows["sogclr"]["note"] and rows["sogclr"]["knn_top1_max"] == ""
    text = Path(out, "results.md").read_text()
    assert "`python main_moco.py " in text and "failed: exit 2; " in text
    with open(os.path.join(out, "knn_vs_time.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # a rerun skips what finished: no child process, the same rows
    monkeypatch.setattr(bench, "run_child", lambda *a, **k: pytest.fail("a finished method ran again"))
    before = Path(out, "results.csv").read_text().splitlines()
    bench.main([*argv[:-5], "moco", "--out", out])
    assert Path(out, "results.csv").read_text().splitlines() == before[:3]
