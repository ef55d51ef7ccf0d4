"""Figure output of the plotting scripts (``scripts/visualize_embeddings.py``, ``scripts/plot_training.py``):
matplotlib with the Agg backend (no display needed), PNG or PDF chosen by the file extension."""
from __future__ import annotations

import os

from .errors import UserError

FORMATS = (".png", ".pdf")


def check_figure_path(path: str) -> str:
    """``path`` if it ends in .png or .pdf (one-line error otherwise)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise UserError(f"figure {path!r}: give a .png or .pdf file name")
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def class_colours(k: int) -> list:
    """``k`` distinguishable colours: tab10 up to 10 classes, tab20 up to 20, then a sampled turbo map."""
    plt = pyplot()
    if k <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(k)]
    if k <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(k)]
    cmap = plt.get_cmap("turbo")
    return [cmap(i / max(k - 1, 1)) for i in range(k)]


def save_figure(fig, path: str, dpi: int = 150) -> str:
    """Write ``fig`` to ``path`` (directories created; format from the extension) and close it."""
    check_figure_path(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path
