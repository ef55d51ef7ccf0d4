#!/usr/bin/env python
"""Loss, lr and top-1 curves of one or several runs from their ``log.jsonl``, and the information
plane of runs that tracked DisCo's "BI analysis" (``eval_linear.py --mi_every N``).

    python scripts/plot_training.py runs/moco_r18 runs/disco_r50_r18 --labels "MoCo v2" DisCo --output curves.png
    python scripts/plot_training.py runs/cifar10_lincls --output cifar.pdf     # + cifar_info_plane.pdf

A RUN is a run directory (its ``log.jsonl``) or a ``.jsonl`` file. The rows the repository writes:
pretraining windows (``iter``: ``loss``, ``lr``), pretraining epochs (``epoch_time_s``: epoch-mean
``loss``, ``lr``, ``knn_top1`` when the kNN monitor ran), linear-probe epochs (``val_acc1``:
``train_loss``, ``lr``, ``val_acc1``) and mutual-information rows (``mi_iter``: ``I_XT``, ``I_TY``).
The x axis is in epochs: window rows sit at epoch + (iter+1)/iterations-per-epoch, epoch rows at the
epoch's end. Rows of a resumed run that were logged twice keep the later value. The figure has one
panel per quantity found (loss, lr, top-1: kNN monitor or linear-probe val), one colour per run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.cli import HelpFormatter  # noqa: E402
from src.errors import UserError, cli_main  # noqa: E402
from src.logger import setup_logging  # noqa: E402
from src.plots import check_figure_path, class_colours, pyplot, save_figure  # noqa: E402

log = logging.getLogger("ssl")
Series = dict[float, float]  # x (epochs) -> value


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training curves (loss, lr, kNN / val top-1) of runs from their "
                                "log.jsonl, and the information plane of --mi_every runs", formatter_class=HelpFormatter)
    p.add_argument("runs", metavar="RUN", nargs="+", help="run directory holding log.jsonl, or a .jsonl file")
    p.add_argument("--labels", nargs="+", default=None, help="legend names, one per RUN (None: the directory names)")
    p.add_argument("--output", "-o", default="training_curves.png", help="curves figure, .png or .pdf")
    p.add_argument("--info_plane", default=None,
                   help="information-plane figure, drawn when a run has I_XT/I_TY rows (default: <output>_info_plane.<ext>)")
    p.add_argument("--title", default=None, help="figure title (default: none)")
    return p


@dataclass
class Run:
    label: str
    loss: Series = field(default_factory=dict)
    lr: Series = field(default_factory=dict)
    top1: Series = field(default_factory=dict)
    top1_kind: set = field(default_factory=set)   # {"kNN", "val"}
    mi: dict[int, tuple[float, float]] = field(default_factory=dict)  # mi_iter -> (I(X;T), I(T;Y))


def log_path(run: str) -> str:
    path = os.path.join(run, "log.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UserError(f"no log found for {run!r}: expected a run directory with log.jsonl or a .jsonl file")
    return path


def read_rows(path: str) -> list[dict]:
    """The JSON objects of ``path``; an unparsable line (a run still writing) is skipped with a warning."""
    rows, bad = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(r, dict):
                rows.append(r)
    if bad:
        log.warning("%s: %d unparsable line(s) skipped", path, bad)
    return rows


def parse_run(rows: list[dict], label: str) -> Run:
    """Sort the rows of one log into the series of :class:`Run` (module docstring)."""
    run = Run(label)
    windows = [r for r in rows if "iter" in r and "loss" in r and "epoch" in r]
    per_epoch = max((int(r["iter"]) for r in windows), default=-1) + 1
    for r in windows:
        x = int(r["epoch"]) + (int(r["iter"]) + 1) / per_epoch
        run.loss[x] = float(r["loss"])
        if "lr" in r:
            run.lr[x] = float(r["lr"])
    for r in rows:
        if "epoch" not in r or "iter" in r or "mi_iter" in r:
            continue
        x = int(r["epoch"]) + 1.0
        loss = r.get("loss", r.get("train_loss"))
        if not windows and loss is not None:
            run.loss[x] = float(loss)
            if "lr" in r:
                run.lr[x] = float(r["lr"])
        for key, kind in (("knn_top1", "kNN"), ("val_acc1", "val")):
            if key in r:
                run.top1[x] = float(r[key])
                run.top1_kind.add(kind)
    for r in rows:
        if "mi_iter" in r:
            run.mi[int(r["mi_iter"])] = (float(r["I_XT"]), float(r["I_TY"]))
    return run


def _line(ax, series: Series, colour, label: str) -> None:
    xs = sorted(series)
    ax.plot(xs, [series[x] for x in xs], color=colour, label=label, marker="o" if len(xs) < 30 else None,
            markersize=3, linewidth=1.2)


def plot_curves(runs: list[Run], path: str, title: str | None = None) -> list[str]:
    """One panel per quantity that some run has; returns the panel names."""
    kinds = sorted(set().union(*(r.top1_kind for r in runs)))
    panels = [(name, ylabel) for name, ylabel in (("loss", "loss"), ("lr", "learning rate"),
                                                   ("top1", f"{' / '.join(kinds)} top-1 (%)"))
              if any(getattr(r, name) for r in runs)]
    if not panels:
        raise UserError("no loss, lr or top-1 rows in the given logs")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    colours = class_colours(len(runs))
    for ax, (name, ylabel) in zip(axes[0], panels):
        for run, colour in zip(runs, colours):
            if getattr(run, name):
                _line(ax, getattr(run, name), colour, run.label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return [name for name, _ in panels]


def plot_info_plane(runs: list[Run], path: str, title: str | None = None) -> None:
    """I(T;Y) against I(X;T) per measurement, points coloured by training iteration."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    last = max(max(r.mi) for r in runs if r.mi)
    norm = plt.Normalize(0, max(last, 1))
    colours = class_colours(len(runs))
    sc = None
    for run, colour in zip(runs, colours):
        if not run.mi:
            continue
        its = sorted(run.mi)
        xs, ys = [run.mi[i][0] for i in its], [run.mi[i][1] for i in its]
        ax.plot(xs, ys, color=colour, linewidth=0.8, alpha=0.6, label=run.label)
        sc = ax.scatter(xs, ys, c=its, cmap="viridis", norm=norm, s=14, zorder=3)
    fig.colorbar(sc, ax=ax, label="training iteration")
    ax.set_xlabel("I(X;T) (bits)")
    ax.set_ylabel("I(T;Y) (bits)")
    ax.set_title(title or "information plane")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


@cli_main
def main(argv=None) -> dict[str, str]:
    args = get_parser().parse_args(argv)
    setup_logging(None)
    check_figure_path(args.output)
    if args.info_plane:
        check_figure_path(args.info_plane)
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise UserError(f"--labels: {len(args.labels)} names for {len(args.runs)} runs")
    labels = args.labels or [os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(r) or r))
                             for r in args.runs]
    runs = [parse_run(read_rows(log_path(r)), lab) for r, lab in zip(args.runs, labels)]
    if args.info_plane and not any(r.mi for r in runs):
        raise UserError("--info_plane: no I_XT/I_TY rows in the given logs (eval_linear.py --mi_every N writes them)")
    panels = plot_curves(runs, args.output, args.title)
    out = {"curves": args.output}
    print(f"{', '.join(panels)} of {len(runs)} run(s) written to {args.output}", flush=True)
    if any(r.mi for r in runs):
        stem, ext = os.path.splitext(args.output)
        out["info_plane"] = args.info_plane or f"{stem}_info_plane{ext}"
        plot_info_plane(runs, out["info_plane"], args.title)
        print(f"information plane of {sum(len(r.mi) for r in runs)} measurements written to {out['info_plane']}",
              flush=True)
    return out


if __name__ == "__main__":
    main()
