#!/usr/bin/env python
"""The released checkpoints (``src/zoo.py``): list them, or download some into the cache.

    python scripts/zoo.py list                      # name, method, arch, epochs, top-1, protocol, layout, host
    python scripts/zoo.py list --markdown           # the README's "Released checkpoints" rows
    python scripts/zoo.py download moco_v2_r50_e800 pcl_v2_r50_e200   # prints the local paths

Same as ``python -m src.zoo``. The cache is ``$SSL_CACHE`` (default ``~/.cache/ssl_zoo``); every
``--pretrained`` / ``--teacher`` / ``--resume`` also takes the names and URLs directly.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.zoo import main  # noqa: E402

if __name__ == "__main__":
    main()
