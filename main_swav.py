#!/usr/bin/env python
"""SwAV pretraining (facebookresearch/swav ``main_swav.py`` flags; spec swav.md).

    python -m torch.distributed.launch --nproc_per_node=8 main_swav.py --data_path /imagenet/train \
        --base_lr 0.6 --final_lr 0.0006 --warmup_epochs 0 --crops_for_assign 0 1 --size_crops 224 96 \
        --nmb_crops 2 6 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14 --use_fp16 true \
        --freeze_prototypes_niters 5005 --queue_length 3840 --epoch_queue_starts 15 --dump_path ./ckpt \
        --sync_bn pytorch --temperature 0.1 --epsilon 0.05 --sinkhorn_iterations 3 --feat_dim 128 \
        --nmb_prototypes 3000 --epochs 200 --batch_size 64 --wd 0.000001 --arch efficientb0

``--batch_size`` is per process. Flags, outputs and differences from the official code: docs/swav.md.
"""
from src.swav_cli import main_swav

if __name__ == "__main__":
    main_swav()
