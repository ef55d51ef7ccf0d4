"""Run outputs on rank 0: console/file log, a JSON-lines log, TensorBoard scalars, the run's arguments."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Mapping

log = logging.getLogger("ssl")


class _StdoutHandler(logging.StreamHandler):
    """A console handler that writes to whatever ``sys.stdout`` is at each record (not the object it was
    at set-up): a script run in-process after its caller swapped or closed stdout still logs cleanly."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(output_dir: str | None, rank: int = 0, name: str = "train.log") -> None:
    """Console (rank 0 only) plus ``<output_dir>/logs/<name>`` (``<name>-<rank>`` on other ranks)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if rank == 0:
        h = _StdoutHandler()
        h.setFormatter(fmt)
        root.addHandler(h)
    if output_dir:
        os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)
        fh = logging.FileHandler(os.path.join(output_dir, "logs", name if rank == 0 else f"{name}-{rank}"))
        fh.setFormatter(fmt)
        root.addHandler(fh)


def save_args(args: Any, output_dir: str, name: str = "args.json") -> None:
    os.makedirs(output_dir, exist_ok=True)
    d = vars(args) if not isinstance(args, Mapping) else dict(args)
    with open(os.path.join(output_dir, name), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True, default=str)


class RunLogger:
    """JSON lines in ``<dir>/log.jsonl`` and TensorBoard scalars in ``<dir>/tb``; inactive off rank 0."""

    def __init__(self, output_dir: str, active: bool = True, tensorboard: bool = True):
        self.active = active
        self.path = os.path.join(output_dir, "log.jsonl")
        self.tb = None
        if active:
            os.makedirs(output_dir, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(os.path.join(output_dir, "tb"))
                except Exception as e:  # noqa: BLE001 - TensorBoard is a nicety, never fatal
                    log.warning("TensorBoard disabled: %s", e)

    def write(self, record: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
        if not self.active:
            return
        rec = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=float) + "\n")
        if self.tb is not None and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "iter", "step"):
                    self.tb.add_scalar(f"{prefix}{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
