"""DisCo's visualisation and "BI analysis" (swav.md §8): the binned mutual information against a
hand-computed joint distribution and a loop reference, ``eval_linear.py --mi_every`` end to end, the
t-SNE script (features saved once, then drawn) and the training-curve / information-plane script."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.eval.mutual_info import binned_mutual_information, binned_states
from tests.conftest import ROOT
from tests.test_eval_linear import make_moco_checkpoint, write_fake_cifar10

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import plot_training  # noqa: E402, I001
import visualize_embeddings  # noqa: E402


# ----------------------------------------------------------------------------- mutual information
# Four binned states (30 bins): A and A' differ as probabilities but share their bins (24, 2, 2);
# C and D differ in two bins only. Labels are arbitrary ids (3, 7, 9), not 0..C-1.
A, A2 = (0.81, 0.095, 0.095), (0.82, 0.09, 0.09)
B = (0.31, 0.38, 0.31)
C, D = (0.12, 0.12, 0.76), (0.12, 0.22, 0.66)
PROBS = [A, A2, A, A2, B, B, C, D]
LABELS = [3, 3, 3, 7, 7, 7, 9, 9]
# p(T) = (1/2, 1/4, 1/8, 1/8) → H(T) = 1/2·1 + 1/4·2 + 2·1/8·3 = 1.75 bits.
# p(Y) = (3/8, 3/8, 1/4) → H(Y) = 2·3/8·log2(8/3) + 1/4·2; H(Y|T) = 1/2·h(1/4) (A holds 3, 3, 3, 7;
# B, C, D are pure), h(1/4) = 1/4·2 + 3/4·log2(4/3) → I(T;Y) = H(Y) − H(Y|T).
H_T = 1.75
I_TY = (0.75 * math.log2(8 / 3) + 0.5) - 0.5 * (0.5 + 0.75 * math.log2(4 / 3))


def logits_of(probs, shift=None) -> np.ndarray:
    """log-probabilities plus an arbitrary per-row constant: their softmax is ``probs``."""
    t = np.log(np.asarray(probs, dtype=np.float64))
    return t + (np.arange(len(t))[:, None] * 3.7 - 5 if shift is None else shift)


def test_binned_mi_hand_computed_case():
    assert I_TY == pytest.approx(1.1556390622, abs=1e-9)
    states = binned_states(logits_of(PROBS))
    assert states[0].tolist() == [24, 2, 2] and (states[0] == states[1]).all() and (states[4] == [9, 11, 9]).all()
    i_xt, i_ty = binned_mutual_information(logits_of(PROBS), LABELS)
    assert i_xt == pytest.approx(H_T, abs=1e-12) and i_ty == pytest.approx(I_TY, abs=1e-12)
    # only the first n samples: A, A', A, A', B, B with labels 3 3 3 7 7 7 → H(T) = h(1/3),
    # I(T;Y) = H(Y) − 2/3·h(1/4) with p(Y) = (1/2, 1/2)
    h3 = -(1 / 3 * math.log2(1 / 3) + 2 / 3 * math.log2(2 / 3))
    i_xt, i_ty = binned_mutual_information(logits_of(PROBS), LABELS, n=6)
    assert i_xt == pytest.approx(h3, abs=1e-12)
    assert i_ty == pytest.approx(1.0 - 2 / 3 * (0.5 + 0.75 * math.log2(4 / 3)), abs=1e-12)
    # right-closed bins as pandas.cut: 0.5 = 15/30 (exact) is in bin 14; an underflowed 0 in bin 0
    assert binned_states(np.zeros((1, 2))).tolist() == [[14, 14]]
    assert binned_states(np.array([[0.0, -2000.0]])).tolist() == [[29, 0]]
    # more bins split A from A': 3 states of A-type → more information in T
    assert binned_mutual_information(logits_of(PROBS), LABELS, bins=300)[0] > H_T


def loop_reference(logits: np.ndarray, labels: np.ndarray, bins: int = 30) -> tuple[float, float]:
    """Written from the formulas with dictionaries: state = tuple of right-closed bin indices."""
    n = len(labels)
    states, joint = {}, {}
    for t, y in zip(logits, labels):
        p = np.exp(t - t.max())
        p = p / p.sum()
        s = tuple(max(math.ceil(v * bins) - 1, 0) for v in p)
        states[s] = states.get(s, 0) + 1
        joint[(s, y)] = joint.get((s, y), 0) + 1
    py = {y: list(labels).count(y) / n for y in set(labels)}
    h = -sum(c / n * math.log2(c / n) for c in states.values())
    i = sum(c / n * math.log2((c / n) / (states[s] / n * py[y])) for (s, y), c in joint.items())
    return h, i


def test_binned_mi_matches_loop_reference_and_bounds():
    rng = np.random.default_rng(0)
    for n, k, scale in ((200, 10, 3.0), (50, 4, 0.3), (64, 17, 8.0)):
        logits = rng.normal(size=(n, k)) * scale
        labels = rng.integers(0, k, n)
        logits[np.arange(n), labels] += scale  # informative outputs
        i_xt, i_ty = binned_mutual_information(logits, labels)
        ref = loop_reference(logits, labels)
        assert (i_xt, i_ty) == pytest.approx(ref, abs=1e-9)
        assert 0 <= i_ty <= i_xt + 1e-12 and i_xt <= math.log2(n) + 1e-12 and i_ty <= math.log2(k) + 1e-12


def test_eval_linear_mi_every_logs_the_estimate_of_the_trained_head(tmp_path):
    """--dataset cifar10 --mi_every 2 over 3 iterations: rows at iterations 0 and 2; the last one
    equals the estimate recomputed from the saved head on the same 12 training images."""
    import eval_linear
    from src.checkpoint import load_backbone
    from src.data.cifar import CifarDataset
    from src.eval.linear import LinearClassifier
    from src.eval.linear_data import cifar_transforms
    data, out = str(tmp_path / "cifar"), str(tmp_path / "lin")
    write_fake_cifar10(data)
    ckpt, _ = make_moco_checkpoint(str(tmp_path / "pre"))
    eval_linear.main([data, "--dataset", "cifar10", "-a", "resnet18", "--pretrained", ckpt, "--dump_path", out,
                      "-j", "0", "--image_size", "32", "-b", "8", "--max_iters", "3", "--epochs", "1", "--lr", "0.001",
                      "--mi_every", "2", "--mi_samples", "12"])
    rows = [json.loads(s) for s in Path(out, "log.jsonl").read_text().splitlines()]
    mi = [r for r in rows if "mi_iter" in r]
    assert [r["mi_iter"] for r in mi] == [0, 2] and all(r["mi_samples"] == 12 and r["epoch"] == 0 for r in mi)
    for r in mi:
        assert 0 <= r["I_TY"] <= r["I_XT"] <= math.log2(12) + 1e-9 and r["I_TY"] <= math.log2(10)
    assert mi[0]["I_XT"] != mi[1]["I_XT"] or mi[0]["I_TY"] != mi[1]["I_TY"]  # the head moved in between

    head = LinearClassifier(512, 10)
    head.load_state_dict(torch.load(os.path.join(out, "checkpoint.pth.tar"), weights_only=False)["state_dict"])
    net = torch.nn.Sequential(load_backbone(ckpt, "resnet18"), head).eval()
    _, test_tf = cifar_transforms(32, (0.229, 0.224, 0.225))
    ds = CifarDataset(data, "cifar10", True, test_tf)
    idx = sorted(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:12].tolist())
    with torch.no_grad():
        t = net(torch.stack([ds[i][0] for i in idx])).numpy()
    want = binned_mutual_information(t, [ds.targets[i] for i in idx])
    assert (mi[1]["I_XT"], mi[1]["I_TY"]) == pytest.approx(want, abs=1e-9)
    with pytest.raises(SystemExit) as e:
        eval_linear.main([data, "--dataset", "cifar10", "--mi_every", "-1", "--dump_path", out])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- figures
def colours(path: str) -> set[tuple[int, int, int]]:
    img = Image.open(path).convert("RGB")
    assert img.size[0] > 200 and img.size[1] > 200
    return set(img.getdata())


def has_colour(cols: set, rgb: tuple, tol: int = 6) -> bool:
    return any(all(abs(a - b) <= tol for a, b in zip(c, rgb)) for c in cols)


TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def on_white(rgb: tuple, alpha: float) -> tuple:
    return tuple(round(alpha * c + (1 - alpha) * 255) for c in rgb)


def test_visualize_embeddings_saves_features_once_then_draws(tiny_folder, tmp_path, capsys):
    from src.checkpoint import load_backbone
    from src.data.datasets import ImageDataset
    from src.data.transforms import eval_transform
    ckpt, _ = make_moco_checkpoint(str(tmp_path / "pre"))
    out = str(tmp_path / "embd")
    png = str(tmp_path / "fig" / "tsne.png")
    visualize_embeddings.main([tiny_folder, "-a", "resnet18", "--pretrained", ckpt, "--image_size", "32", "-j", "0",
                               "--out", out, "--output", png, "--per_class", "3"])
    x = np.load(os.path.join(out, "resnet18_embd.npy"))
    y = np.load(os.path.join(out, "resnet18_label.npy"))
    ds = ImageDataset(os.path.join(tiny_folder, "val"), eval_transform(32))
    assert x.shape == (16, 512) and y.tolist() == ds.targets
    with torch.no_grad():  # unnormalised pooled features of the checkpoint's backbone, in dataset order
        want = load_backbone(ckpt, "resnet18").eval()(torch.stack([ds[i][0] for i in (0, 9)])).numpy()
    assert np.allclose(x[[0, 9]], want, atol=1e-5) and not np.allclose(np.linalg.norm(x, axis=1), 1.0)
    assert json.loads(Path(out, "resnet18_classes.json").read_text())["classes"] == ds.classes
    # 4 classes < 15: every class (draw.py's 5-14 needs 15), the first 3 images of each
    tsne = np.load(str(tmp_path / "fig" / "tsne.npz"))
    assert tsne["coords"].shape == (12, 2) and tsne["labels"].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert tsne["indices"].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14]
    assert np.ptp(tsne["coords"], axis=0).min() > 0
    cols = colours(png)
    assert all(has_colour(cols, on_white(c, visualize_embeddings.ALPHA)) for c in TAB10)  # one colour per class

    # drawn again from the saved features, without the data, from DisCo main_embd.py's file names
    # (no extension): other classes, every image of them, PDF
    for k in ("embd", "label"):
        os.rename(os.path.join(out, f"resnet18_{k}.npy"), os.path.join(out, f"resnet18_{k}"))
    pdf = str(tmp_path / "two.pdf")
    visualize_embeddings.main(["-a", "resnet18", "--out", out, "--classes", "1,3", "--per_class", "0", "--output", pdf])
    assert Path(pdf).read_bytes()[:5] == b"%PDF-"
    assert np.load(str(tmp_path / "two.npz"))["indices"].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    capsys.readouterr()
    for argv in (["-a", "resnet18", "--out", out, "--classes", "2-6"],       # classes out of range
                 ["-a", "resnet50", "--out", out],                           # nothing saved for that arch
                 ["-a", "resnet18", "--out", out, "--output", "x.jpg"],       # not PNG/PDF
                 [tiny_folder, "-a", "resnet18", "--pretrained", str(tmp_path / "none.pth")]):
        with pytest.raises(SystemExit) as e:
            visualize_embeddings.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def write_logs(tmp_path) -> tuple[str, str]:
    """A pretraining log (3 windows per epoch of 6 iterations, epoch rows with kNN every 2 epochs,
    epoch 1 logged twice after a resume) and a linear-probe log with mutual-information rows."""
    pre, lin = tmp_path / "moco", tmp_path / "lincls"
    pre.mkdir()
    lin.mkdir()
    rows = []
    for e in range(4):
        for it in (1, 3, 5):
            rows.append({"epoch": e, "iter": it, "lr": 0.03 * (1 - (e * 6 + it) / 24), "loss": 8.0 - e - it / 6,
                         "img_per_s": 100.0})
        rows.append({"epoch": e, "loss": 7.5 - e, "lr": 0.03, "epoch_time_s": 5.0,
                     **({"knn_top1": 20.0 + 10 * e} if e % 2 else {})})
        if e == 1:  # killed after epoch 1 and resumed from its checkpoint: epoch 1 logged again
            rows[-4:] = rows[-4:] + [{**r, "loss": r["loss"] - 0.5} for r in rows[-4:]]
    (pre / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"epoch\": 4, \"it")
    lin_rows = [{"mi_iter": 0, "epoch": 0, "I_XT": 2.0, "I_TY": 0.5, "mi_samples": 100}]
    for e in range(3):
        lin_rows.append({"epoch": e, "lr": 3.0, "train_loss": 2.0 - 0.5 * e, "val_acc1": 40.0 + 5 * e,
                         "best_acc1": 40.0 + 5 * e})
        lin_rows.append({"mi_iter": 10 * (e + 1), "epoch": e, "I_XT": 3.0 + e, "I_TY": 1.0 + 0.4 * e,
                         "mi_samples": 100})
    (lin / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lin_rows) + "\n")
    return str(pre), str(lin)


def test_plot_training_reads_the_logs_and_draws_curves_and_info_plane(tmp_path, capsys):
    pre, lin = write_logs(tmp_path)
    run = plot_training.parse_run(plot_training.read_rows(os.path.join(pre, "log.jsonl")), "moco")
    assert sorted(run.loss) == pytest.approx([e + k / 3 for e in range(4) for k in (1, 2, 3)])
    assert run.loss[1 + 2 / 3] == pytest.approx(8.0 - 1 - 3 / 6 - 0.5)  # the resumed run's value wins
    assert run.lr[0 + 4 / 6] == pytest.approx(0.03 * (1 - 3 / 24))
    assert run.top1 == {2.0: 30.0, 4.0: 50.0} and run.top1_kind == {"kNN"} and not run.mi
    probe = plot_training.parse_run(plot_training.read_rows(os.path.join(lin, "log.jsonl")), "probe")
    assert probe.loss == {1.0: 2.0, 2.0: 1.5, 3.0: 1.0} and probe.top1 == {1.0: 40.0, 2.0: 45.0, 3.0: 50.0}
    assert probe.mi == {0: (2.0, 0.5), 10: (3.0, 1.0), 20: (4.0, 1.4), 30: (5.0, 1.8)}

    out = plot_training.main([pre, lin, "--labels", "MoCo v2", "linear probe", "--output",
                              str(tmp_path / "plots" / "curves.png")])
    assert out == {"curves": str(tmp_path / "plots" / "curves.png"),
                   "info_plane": str(tmp_path / "plots" / "curves_info_plane.png")}
    assert "1 unparsable line" in capsys.readouterr().out  # the half-written last line
    cols = colours(out["curves"])
    assert has_colour(cols, TAB10[0]) and has_colour(cols, TAB10[1])  # both runs drawn
    assert len(cols) > 20
    assert len(colours(out["info_plane"])) > 20
    # one run without MI rows, PDF: no information plane
    out = plot_training.main([pre, "--output", str(tmp_path / "c.pdf")])
    assert set(out) == {"curves"} and Path(out["curves"]).read_bytes()[:5] == b"%PDF-"
    capsys.readouterr()
    for argv in ([str(tmp_path / "missing")], [pre, lin, "--labels", "one"], [pre, "--output", "c.svg"],
                 [pre, "--info_plane", str(tmp_path / "ip.png"), "--output", str(tmp_path / "no.png")]):
        with pytest.raises(SystemExit) as e:
            plot_training.main(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith("error: ")
    assert not os.path.exists(tmp_path / "no.png")  # checked before anything is drawn
