#!/usr/bin/env python
"""LORAC pretraining (ssl-codelab/lorac ``main_lorac.py`` flags; moco_m_lorac.md §2, §8.2).

MoCo-M's model, data, optimiser and checkpoints with LORAC's pairing and, from
``--epoch_lorac_starts`` on, the per-sample nuclear norm of [3 global queries; 2 keys] subtracted
(÷ ``--lorac_beta``) from the positive logit; as in the official code the logits then lose the
temperature (``--lorac_use_temperature true`` keeps it).
"""
from src.mocom_cli import main_lorac

if __name__ == "__main__":
    main_lorac()
