"""Shared engine for contrastive self-supervised learning (MoCo v2, MoCo-M, LORAC, SogCLR, CaCo, DisCo, PCL)."""
