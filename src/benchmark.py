"""The small-image benchmark of ``scripts/benchmark_small.py``: per-method command lines, the budgets,
reading a finished run's ``log.jsonl`` into a result row, the results table (Markdown, CSV) and the
accuracy-against-wall-time plot with lightly's published points (anchors §2b).

Every method runs through its own entry script with its own flags; the protocol is lightly's CIFAR-10
benchmark: ResNet-18 with the CIFAR stem (the small-image preset of ``--dataset cifar10|cifar100|stl10``),
kNN k = 200, t = 0.1 on the backbone features after every epoch (``--knn_protocol lightly``), top-1
reported as the maximum over epochs.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field

from .errors import UserError
from .plots import class_colours, pyplot, save_figure

# lightly docs, benchmarks.rst (lightly e8d317f; the same table heads benchmarks/cifar10_benchmark.py,
# "Updated 27.03.2023"): CIFAR-10, ResNet-18 CIFAR variant, kNN k=200 t=0.1 max over epochs, one RTX A6000.
# (method, batch, epochs) -> (kNN top-1 as a fraction, wall time in minutes, peak GPU memory in GB).
LIGHTLY_SOURCE = "lightly docs/source/getting_started/benchmarks.rst @ e8d317f (CIFAR-10, 27.03.2023, 1 x RTX A6000)"
LIGHTLY_CIFAR10 = {
    ("MoCo", 128, 200): (0.838, 128.8, 1.7), ("MoCo", 512, 200): (0.847, 112.2, 5.6), ("MoCo", 512, 800): (0.899, 417.8, 5.4),
    ("SimCLR", 128, 200): (0.847, 97.7, 1.5), ("SimCLR", 512, 200): (0.848, 87.1, 4.9), ("SimCLR", 512, 800): (0.879, 331.1, 4.9),
    ("DCL", 128, 200): (0.844, 102.2, 1.5), ("DCL", 512, 200): (0.840, 88.2, 4.9), ("DCL", 512, 800): (0.874, 334.6, 4.9),
    ("DCLW", 128, 200): (0.833, 100.4, 1.5), ("DCLW", 512, 200): (0.824, 87.9, 4.9), ("DCLW", 512, 800): (0.871, 333.3, 4.9),
    ("SwaV", 128, 200): (0.812, 99.6, 1.5), ("SwaV", 512, 200): (0.842, 88.7, 4.9), ("SwaV", 512, 800): (0.884, 330.5, 5.0),
    ("BYOL", 128, 200): (0.869, 121.9, 1.6), ("BYOL", 512, 200): (0.868, 108.3, 5.6), ("BYOL", 512, 800): (0.910, 400.9, 5.4),
    ("SimSiam", 128, 200): (0.819, 97.3, 1.6), ("SimSiam", 512, 200): (0.764, 87.8, 5.0),
    ("SimSiam", 512, 800): (0.904, 333.7, 5.1),
    ("BarlowTwins", 128, 200): (0.842, 375.9, 1.7), ("BarlowTwins", 512, 200): (0.819, 153.3, 5.1),
    ("BarlowTwins", 512, 800): (0.859, 517.5, 7.9),
}

METHODS = ("moco", "moco_m", "lorac", "sogclr", "caco", "swav", "pcl", "disco")
SCRIPTS = {m: f"main_{m}.py" for m in METHODS}
NAMES = {"random": "random init (no training)", "moco": "MoCo v2", "moco_m": "MoCo-M", "lorac": "LORAC", "sogclr": "SogCLR", "caco": "CaCo", "swav": "SwAV",
         "pcl": "PCL v2", "disco": "DisCo"}


@dataclass(frozen=True)
class Budget:
    """How long and how big: the GPU presets are lightly's protocol, ``cpu`` a short smoke budget."""
    name: str
    epochs: int
    batch: int
    workers: int
    max_iters: int | None = None      # per-epoch iteration cap (None: whole epochs)
    image_size: int | None = None     # None: the images' side (the preset)
    queue: int = 8192                 # MoCo-family queue / CaCo memory / PCL negatives (multiple of the batch)
    clusters: str = "2000,4000,8000"  # PCL k-means sizes
    pcl_warmup: int = 20              # PCL epochs before the first E-step
    local_crops: int = 5              # MoCo-M / LORAC multi-crop local crops (3 global + these)
    swav_freeze: int = 100            # SwAV iterations with frozen prototypes (~1 epoch of CIFAR at bs512)
    fp16: bool = True


BUDGETS = {
    "gpu200": Budget("gpu200", epochs=200, batch=512, workers=8),
    "gpu800": Budget("gpu800", epochs=800, batch=512, workers=8),
    # 2 shared CPU cores: 2 epochs of at most 25 steps of batch 32, 16 px crops of the generated textures
    "cpu": Budget("cpu", epochs=2, batch=32, workers=1, max_iters=25, image_size=16, queue=256,
                  clusters="100,200", pcl_warmup=1, local_crops=2, swav_freeze=20, fp16=False),
}


def method_argv(method: str, b: Budget, data: str, dataset: str, out: str, teacher: str | None = None,
                teacher_arch: str = "resnet50") -> list[str]:
    """The script's own command line (without the interpreter and script name) for ``method`` under ``b``."""
    common = ["--dataset", dataset, "--knn_protocol", "lightly", "--output_dir", out, "--epochs", str(b.epochs)]
    if b.max_iters:
        common += ["--max_iters", str(b.max_iters)]
    if b.image_size:
        common += ["--image_size", str(b.image_size)]
    fp16 = ["--use_fp16", "true" if b.fp16 else "false"]
    lr = f"{0.06 * b.batch / 128:g}"   # lightly's MoCo recipe: SGD lr 0.06 x batch/128, wd 5e-4, T 0.1, m 0.99
    moco = ["-a", "resnet18", "-b", str(b.batch), "-j", str(b.workers), "--lr", lr, "--wd", "5e-4", "--mlp",
            "--aug-plus", "--cos"]
    multicrop = ["--arch", "resnet18", "--batch_size", str(b.batch), "--workers", str(b.workers), "--nmb_crops", "3",
                 str(b.local_crops), "--size_crops", "224", "96", "--min_scale_crops", "0.14", "0.05",
                 "--max_scale_crops", "1.", "0.14", "--crops_for_assign", "0", "1", "--moco-dim", "128",
                 "--moco-k", str(b.queue), "--moco-m", "0.99", "--temperature", "0.2", "--mlp", "true",
                 "--base_lr", "1.8", "--final_lr", "0.018", "--wd", "1e-6", "--warmup_epochs", "0",
                 "--sync_bn", "pytorch", *fp16]
    if method == "moco":
        return [data, *moco, "--moco-t", "0.1", "--moco-k", str(b.queue), "--moco-m", "0.99", *fp16, *common]
    if method == "moco_m":
        return ["--data_path", data, *multicrop, *common]
    if method == "lorac":
        return ["--data_path", data, *multicrop, "--lorac_beta", "15.", "--epoch_lorac_starts",
                str(b.epochs // 2), *common]
    if method == "sogclr":
        return ["--data", data, "-a", "resnet18", "-b", str(b.batch), "--workers", str(b.workers), "--lr", ".075",
                "--learning-rate-scaling", "sqrt", "--loss_type", "dcl", "--gamma", "0.9", "--crop-min", ".08",
                "--wd", "1e-6", *fp16, *common]
    if method == "caco":
        return ["--data", data, "-a", "resnet18", "--batch_size", str(b.batch), "--workers", str(b.workers),
                "--type", "0", "--lr", "0.3", "--lr_final", "0.003", "--memory_lr", "3.0", "--memory_lr_final", "3.0",
                "--cluster", str(b.queue), "--moco_t", "0.08", "--mem_t", "0.08", "--wd", "1.5e-6", "--mem_wd", "0",
                "--moco_dim", "256", "--moco_m", "0.99", "--moco_m_decay", "1", "--mlp_dim", "2048",
                "--warmup_epochs", str(min(10, b.epochs // 10)), "--mem_momentum", "0.9", "--ad_init", "1",
                "--multi_crop", "0", *fp16, *common]
    if method == "swav":   # lightly's SwaV: two 32 px crops, no local crops
        return ["--data_path", data, "--arch", "resnet18", "--batch_size", str(b.batch), "--workers", str(b.workers),
                "--nmb_crops", "2", "--size_crops", str(b.image_size or 32), "--min_scale_crops", "0.14",
                "--max_scale_crops", "1.", "--crops_for_assign", "0", "1", "--temperature", "0.1",
                "--epsilon", "0.05", "--sinkhorn_iterations", "3", "--feat_dim", "128", "--nmb_prototypes", "512",
                "--queue_length", str(max(b.queue // 2, 2 * b.batch)), "--epoch_queue_starts", "15",
                "--base_lr", "0.6", "--final_lr", "0.0006", "--warmup_epochs", "0",
                "--freeze_prototypes_niters", str(b.swav_freeze), "--wd", "1e-6", "--sync_bn", "pytorch",
                *fp16, *common]
    if method == "pcl":
        return [data, *moco, "--temperature", "0.1", "--pcl-r", str(min(b.queue // 8, 1024) // b.batch * b.batch
                                                                     or b.batch),
                "--num-cluster", b.clusters, "--warmup-epoch", str(b.pcl_warmup), *fp16, *common]
    if method == "disco":
        if not teacher:
            raise UserError("DisCo needs --teacher")
        return [data, *moco, "--moco-t", "0.1", "--moco-k", str(b.queue), "--moco-m", "0.99",
                "--teacher_arch", teacher_arch, "--teacher", teacher, *fp16, *common]
    raise UserError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")


# ----------------------------------------------------------------------------- results
@dataclass
class Result:
    method: str
    status: str                         # "ok" or "failed"
    command: str
    budget: str
    batch: int
    epochs: int
    hardware: str
    wall_s: float = 0.0
    memory_mb: float | None = None
    memory_kind: str = ""               # "CUDA max_memory_allocated" or "peak RSS"
    knn: list[float] = field(default_factory=list)        # top-1 (%) after each epoch
    knn_time_s: list[float] = field(default_factory=list)  # seconds from the start at each of them
    note: str = ""                      # the last log line of a failed run
    backbone: str = "ResNet-18 (CIFAR stem)"

    @property
    def knn_max(self) -> float | None:
        return max(self.knn) if self.knn else None


def read_log(path: str) -> list[dict]:
    """The JSON rows of a run's ``log.jsonl`` (a line cut short by a kill is skipped)."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict):
                rows.append(r)
    return rows


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def knn_curve(rows: list[dict], start_time: float) -> tuple[list[float], list[float], float | None]:
    """(kNN top-1 per epoch, seconds since ``start_time`` at each, CUDA peak MB or None) from the epoch
    rows of ``log.jsonl`` (``knn_top1``, ``time``, ``cuda_max_memory_allocated_mb``); a resumed epoch keeps
    its last row."""
    per_epoch: dict[int, dict] = {}
    for r in rows:
        if "epoch" in r and "iter" not in r and "knn_top1" in r:
            per_epoch[int(r["epoch"])] = r
    eps = sorted(per_epoch)
    knn = [float(per_epoch[e]["knn_top1"]) for e in eps]
    times = [round(float(per_epoch[e].get("time", start_time)) - start_time, 3) for e in eps]
    mem = [float(r["cuda_max_memory_allocated_mb"]) for r in rows if "cuda_max_memory_allocated_mb" in r]
    return knn, times, (max(mem) if mem else None)


def save_result(res: Result, path: str) -> None:
    with open(path, "w") as f:
        json.dump(asdict(res), f, indent=2)


def load_result(path: str) -> Result:
    with open(path) as f:
        return Result(**json.load(f))


COLUMNS = ["method", "backbone", "batch", "epochs", "kNN top-1 (%)", "time", "memory", "hardware", "status", "command"]


def _memory(r: Result) -> str:
    if r.memory_mb is None:
        return "—"
    return f"{r.memory_mb / 1024:.2f} GB" if r.memory_mb >= 1024 else f"{r.memory_mb:.0f} MB"


def _row(r: Result) -> list[str]:
    top1 = f"{r.knn_max:.2f}" if r.knn_max is not None else "—"
    status = "ok" if r.status == "ok" else f"failed: {r.note}"
    return [NAMES.get(r.method, r.method), r.backbone, str(r.batch), str(r.epochs), top1, f"{r.wall_s / 60:.1f} min",
            _memory(r), r.hardware, status, r.command]


def write_markdown(results: list[Result], path: str, title: str, notes: list[str] = ()) -> str:
    kinds = sorted({r.memory_kind for r in results if r.memory_kind})
    cols = [c if c != "memory" else f"memory ({' / '.join(kinds) or 'peak'})" for c in COLUMNS]
    lines = [f"# {title}", "", *notes, "" if notes else None, "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    esc = [[c.replace("|", "\\|") if i != len(cols) - 1 else f"`{c}`" for i, c in enumerate(_row(r))] for r in results]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    lines += ["", f"Published reference: {LIGHTLY_SOURCE}."]
    with open(path, "w") as f:
        f.write("\n".join(x for x in lines if x is not None) + "\n")
    return path


def write_csv(results: list[Result], path: str) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "name", "status", "backbone", "batch", "epochs", "budget", "knn_top1_max", "knn_top1_last",
                    "knn_top1_per_epoch", "wall_min", "memory_mb", "memory_kind", "hardware", "note", "command"])
        for r in results:
            w.writerow([r.method, NAMES.get(r.method, r.method), r.status, r.backbone, r.batch, r.epochs, r.budget,
                        "" if r.knn_max is None else f"{r.knn_max:.3f}", f"{r.knn[-1]:.3f}" if r.knn else "",
                        ";".join(f"{v:.3f}" for v in r.knn), f"{r.wall_s / 60:.3f}",
                        "" if r.memory_mb is None else f"{r.memory_mb:.1f}", r.memory_kind, r.hardware, r.note,
                        r.command])
    return path


def plot(results: list[Result], path: str, title: str) -> str:
    """kNN top-1 (%) against wall time (min), one line per method, lightly's published points as markers."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in results:
        if r.method == "random" and r.knn:
            ax.axhline(r.knn[0], color="grey", linestyle="--", linewidth=1, label="random init (ours)")
    ok = [r for r in results if r.knn and r.method != "random"]
    for r, colour in zip(ok, class_colours(max(len(ok), 1))):
        ax.plot([t / 60 for t in r.knn_time_s], r.knn, color=colour, marker="o", markersize=3, linewidth=1.3,
                label=f"{NAMES.get(r.method, r.method)} (ours, bs{r.batch})")
    markers = {(128, 200): "v", (512, 200): "s", (512, 800): "D"}
    lightly = sorted({m for m, _, _ in LIGHTLY_CIFAR10})
    for name, colour in zip(lightly, plt.get_cmap("Dark2")(range(len(lightly)))):
        for (m, bs, ep), (acc, minutes, _) in LIGHTLY_CIFAR10.items():
            if m == name:
                ax.scatter([minutes], [100 * acc], marker=markers[(bs, ep)], color=colour, edgecolor="black",
                           linewidths=0.5, s=36, zorder=3)
        ax.scatter([], [], marker="o", color=colour, edgecolor="black", linewidths=0.5, label=f"lightly {name}")
    for (bs, ep), mk in markers.items():
        ax.scatter([], [], marker=mk, color="white", edgecolor="black", label=f"lightly bs{bs}, {ep} ep")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("wall time (min, symlog)")
    ax.set_ylabel("kNN top-1 (%), k=200, t=0.1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.text(0.01, -0.02, f"markers: {LIGHTLY_SOURCE}", fontsize=6)
    return save_figure(fig, path)
