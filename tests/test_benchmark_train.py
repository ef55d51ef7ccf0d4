"""scripts/benchmark_train.py: the table's structure, the outside-backbone share from real timings,
the methods built by their scripts' own builders, and PCL's E-step extrapolation."""
from __future__ import annotations

import csv
import importlib.util
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "-a", "resnet18", "--image_size", "16", "--batch_size", "4", "--warmup", "1", "--iters", "3"]


@pytest.fixture(scope="module")
def bench():
    path = os.path.join(ROOT, "scripts", "benchmark_train.py")
    spec = importlib.util.spec_from_file_location("benchmark_train", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_train"] = mod   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _pct(s: str) -> float:
    return float(s.rstrip("%")) / 100


@pytest.fixture(scope="module")
def plain(bench, tmp_path_factory):
    """MoCo v2 (two crops) and SwAV (multi-crop) at 16 px, batch 4: (table, stdout, CSV path)."""
    import contextlib
    import io
    out = tmp_path_factory.mktemp("bench") / "t.csv"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        table = bench.run(TINY + ["--methods", "moco", "swav", "--csv", str(out)])
    return table, buf.getvalue(), out


def test_table_and_csv(bench, plain):
    """One Markdown row per method with every column, consistent numbers (images/s = batch / step,
    outside = 1 - backbone / step), the CPU verdict, and the same rows in the CSV."""
    table, text, out = plain
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| method | crops | batch | images/s | ms/step | backbone ms | outside backbone |")
    assert set(lines[1]) <= {"|", "-"}
    assert len(lines) == 2 + 2 and all(ln.count("|") == len(bench.COLUMNS) + 1 for ln in lines)
    assert [r["method"] for r in table] == ["MoCo v2", "SwAV"]
    assert [r["crops"] for r in table] == ["2x16", "2x16+6x8"]   # SwAV's 2x224+6x96 scaled to 16 px
    for r in table:
        step, base = float(r["ms_per_step"]), float(r["backbone_ms"])
        assert 0 < base and 0 < step
        assert float(r["images_per_s"]) == pytest.approx(4 / step * 1e3, rel=0.01, abs=0.051)  # printed to 0.1
        assert _pct(r["outside_backbone"]) == pytest.approx(1 - base / step, abs=0.002)
        assert float(r["peak_memory_mb"]) > 0
        assert r["target"] == "n/a (CPU)"
    with open(out) as f:
        assert list(csv.DictReader(f)) == [{k: str(v) for k, v in r.items()} for r in table]


def test_outside_share_follows_the_loss_time(bench, plain, monkeypatch):
    """A MoCo loss made 300 ms slower raises ms/step by about that much and the outside share with it,
    while the backbone-only time does not move: the share is measured, not assumed."""
    import src.methods.moco as moco
    base = plain[0][0]
    real_loss = moco.moco_loss

    def slow_loss(*a, **k):
        time.sleep(0.3)
        return real_loss(*a, **k)
    monkeypatch.setattr(moco, "moco_loss", slow_loss)
    slow = bench.run(TINY + ["--methods", "moco"])[0]
    d_step = float(slow["ms_per_step"]) - float(base["ms_per_step"])
    assert d_step > 200
    assert _pct(slow["outside_backbone"]) > _pct(base["outside_backbone"]) + 0.15
    assert float(slow["backbone_ms"]) < float(base["backbone_ms"]) + 0.5 * d_step


def test_methods_come_from_the_scripts_builders(bench, monkeypatch):
    """The benchmark builds each method with its script's own builder, from the official flags, and
    puts it in the steady state of the last epoch (LORAC's prior on, PCL's prototypes in use)."""
    import main_lorac
    import main_pcl
    calls = []
    for mod in (main_lorac, main_pcl):
        real = mod.build_method

        def spy(*a, _real=real, _name=mod.__name__, **k):
            calls.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(mod, "build_method", spy)
    a = bench.resolve(bench.get_parser().parse_args(TINY))
    info = bench.D.DistInfo(device=a.device)
    args, method, _, _ = bench.build("lorac", a, info)
    bench.steady_state("lorac", method, args, args.epochs - 1)
    assert method.lorac and method.lorac_active and method.K == 65536 and method.nmb_crops == [3, 5]
    args, method, _, _ = bench.build("pcl", a, info)
    bench.steady_state("pcl", method, args, args.epochs - 1)
    assert method.use_proto and method._num_ids == list(bench.PCL_CLUSTERS) and method.r == 16384
    assert calls == ["main_lorac", "main_pcl"]


def test_estep_extrapolation(bench):
    """c = t / (N·ΣK); per image c·ΣK_target; share = per image × images/s (1 s for 1000 images × 100
    clusters → 1e-5 s per image-cluster; 175 000 clusters → 1.75 s per image; at 2 images/s: 350 %)."""
    c, per_image, share = bench.estep_share(1.0, 1000, [20, 30, 50], (25000, 50000, 100000), 2.0)
    assert c == pytest.approx(1e-5)
    assert per_image == pytest.approx(1.75)
    assert share == pytest.approx(3.5)
