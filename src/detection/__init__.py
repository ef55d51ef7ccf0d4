"""Detection transfer (disco_pcl_evals.md C5, D3.4): the MoCo C4 protocol.

- :mod:`.d2_format`: torchvision ResNet keys <-> Detectron2 keys, the ``.pkl`` Detectron2 reads;
- :mod:`.config`: the Detectron2-style YAML configs (``_BASE_``, ``KEY VALUE`` overrides) read
  without Detectron2, for ``detection/train_torchvision.py``;
- :mod:`.data`: VOC devkit and COCO json datasets, the iteration sampler;
- :mod:`.model`: the C4 Faster R-CNN built from torchvision's detection package;
- :mod:`.train`: solver, schedule, PreciseBN, checkpoints, the training loop and evaluation;
- :mod:`.synthetic`: a generated VOC devkit folder (tests, smoke runs).
The AP math lives in :mod:`src.eval.detection`.
"""
