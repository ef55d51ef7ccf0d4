#!/usr/bin/env python
"""DisCo + SwAV pretraining (DisCo ``swav-master/main_swav_distill.py``; disco_pcl_evals.md A7, swav.md §3):
the flags of ``main_swav.py`` plus the frozen SwAV teacher.

    python -m torch.distributed.launch --nproc_per_node=8 main_swav_distill.py --data_path /imagenet/train \
        ... (the main_swav.py flags) ... --arch efficientb0 --pretrained swav_800ep_pretrain.pth.tar

The loss is SwAV's plus ``F.mse_loss(student, teacher) / len(crops_for_assign)`` with the student
normalised and the teacher not (official); ``--distill_normalize_teacher true`` compares two unit
vectors. See docs/swav.md.
"""
from src.swav_cli import main_swav_distill

if __name__ == "__main__":
    main_swav_distill()
