"""Shared fixtures: tiny generated image folders, a 2-process gloo runner."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> str:
    """4 classes × 8 train / 4 val images of 32 px coloured shapes."""
    from src.data.builtin import make_synthetic_folder
    return make_synthetic_folder(str(tmp_path_factory.mktemp("tiny")), num_classes=4, train_per_class=8,
                                 val_per_class=4, size=32, seed=0)


@pytest.fixture
def repo_root() -> str:
    return ROOT
