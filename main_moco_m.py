#!/usr/bin/env python
"""MoCo-M pretraining (ssl-codelab/lorac ``main_moco_m.py`` flags; moco_m_lorac.md §1, §3-5, §8.1).

    python -m torch.distributed.launch --nproc_per_node=4 main_moco_m.py --data_path /imagenet/train \
        --nmb_crops 3 5 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14 \
        --crops_for_assign 0 1 --moco-dim 128 --moco-k 65536 --moco-m 0.999 --temperature 0.2 --mlp true \
        --epochs 200 --batch_size 64 --base_lr 1.8 --final_lr 0.018 --wd 1e-6 --warmup_epochs 0 \
        --checkpoint_freq 1 --arch mocom_r50 --use_fp16 true --sync_bn pytorch --dump_path /exp

``--batch_size`` is per process. ``--mocom_query_exclude key_crop`` gives the intended pairing.
The flags, the outputs and the differences from the official code: README / src/mocom_cli.py.
"""
from src.mocom_cli import main_moco_m

if __name__ == "__main__":
    main_moco_m()
