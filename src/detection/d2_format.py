"""torchvision ResNet keys <-> Detectron2 keys, and the ``.pkl`` file Detectron2 loads (disco_pcl_evals.md C5).

The renaming of MoCo's ``convert-pretrain-to-detectron2.py``, applied to a backbone state dict that
``src.checkpoint.load_backbone`` has already extracted (so every checkpoint layout it knows works):

====================================  ===========================================
torchvision                           Detectron2
====================================  ===========================================
``conv1.weight``, ``bn1.*``           ``stem.conv1.weight``, ``stem.conv1.norm.*``
``layer1`` .. ``layer4``              ``res2`` .. ``res5``
``bn1`` / ``bn2`` / ``bn3``           ``conv1.norm`` / ``conv2.norm`` / ``conv3.norm``
``downsample.0`` / ``downsample.1``   ``shortcut`` / ``shortcut.norm``
====================================  ===========================================

Values become numpy arrays (BN ``running_mean/var`` and ``num_batches_tracked`` included). The file is
``{"model": ..., "__author__": "MOCO", "matching_heuristics": True}``: Detectron2's checkpointer takes a
``.pkl`` holding ``model`` and ``__author__`` as its own format, ``matching_heuristics`` makes it map
``res4.*`` → ``backbone.res4.*`` and ``res5.*`` → ``roi_heads.res5.*`` by longest suffix, and any author
other than ``"Caffe2"`` avoids its Caffe2 renaming.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Mapping

import numpy as np
import torch

from ..errors import UserError

AUTHOR = "MOCO"


def to_detectron2_key(k: str) -> str:
    """One torchvision ResNet key in Detectron2's naming (the table above)."""
    if "layer" not in k:
        k = "stem." + k
    for t in (1, 2, 3, 4):
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    return k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def from_detectron2_key(k: str) -> str:
    """The inverse of :func:`to_detectron2_key`."""
    k = k.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    k = re.sub(r"conv([123])\.norm", r"bn\1", k)
    k = re.sub(r"res([2345])", lambda m: f"layer{int(m.group(1)) - 1}", k)
    return k.removeprefix("stem.")


def to_detectron2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torchvision ResNet backbone state dict (no ``fc``) as Detectron2 names → numpy arrays."""
    return {to_detectron2_key(k): v.detach().cpu().numpy() for k, v in state_dict.items()}


def from_detectron2(model: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Detectron2-named ResNet weights back to torchvision names (``stem.fc.*`` junk left out)."""
    out = {}
    for k, v in model.items():
        name = from_detectron2_key(k)
        if name.split(".")[0] == "fc":
            continue
        out[name] = torch.as_tensor(np.asarray(v))
    return out


def write_pkl(model: dict[str, np.ndarray], path: str) -> None:
    """Write Detectron2's ``.pkl`` (temp file + rename, so a reader never sees half a file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".pkl")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump({"model": model, "__author__": AUTHOR, "matching_heuristics": True}, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _NumpyOnly(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else: no pickled code runs."""
    ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"),
                         ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")})

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED or (module.startswith("numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_pkl(path: str) -> dict[str, np.ndarray]:
    """The ``model`` dict of a Detectron2-format ``.pkl`` (ours or MoCo's converter output)."""
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = _NumpyOnly(f, encoding="latin1").load()
    except Exception as e:
        raise UserError(f"cannot read {path} as a Detectron2 .pkl of numpy arrays: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"{path} holds no 'model' dict (not a Detectron2-format .pkl)")
    if data.get("__author__") == "Caffe2":
        raise UserError(f"{path} is a Caffe2 (MSRA, BGR) model: torchvision's ResNet takes torchvision-style "
                        "weights only (convert a pretraining checkpoint with detection/convert_to_detectron2.py)")
    return data["model"]
