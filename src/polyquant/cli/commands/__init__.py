"""The commands: each module here registers its commands with ``@command`` (see
:mod:`polyquant.cli.base`); importing this package imports every module in it, so adding a
command is adding one function in one module (a new module needs no other edit)."""
from __future__ import annotations

import importlib
import pkgutil

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")
