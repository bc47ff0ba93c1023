"""polyquant's cache folder, one name for every cache: ``$POLYQUANT_CACHE_DIR``, else
``$XDG_CACHE_HOME/polyquant``, else ``~/.cache/polyquant``. It holds the default model dequantized
once to an fp32 Hugging Face folder (``gguf/``, about 517 MB) and the compiled C kernels (``cext/``).
``POLYQUANT_CACHE`` (the default model's earlier variable) is still read, with a deprecation warning."""
from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["cache_root", "ENV", "DEPRECATED_ENV"]

ENV = "POLYQUANT_CACHE_DIR"
DEPRECATED_ENV = "POLYQUANT_CACHE"
_warned = False


def cache_root() -> Path:
    global _warned
    root = os.environ.get(ENV)
    if not root and os.environ.get(DEPRECATED_ENV):
        root = os.environ[DEPRECATED_ENV]
        if not _warned:
            logging.getLogger("polyquant").warning("%s is deprecated: set %s instead", DEPRECATED_ENV, ENV)
            _warned = True
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "polyquant")
    return Path(root).expanduser()
