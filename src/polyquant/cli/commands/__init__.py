"""The commands: each module here registers its commands with ``@command`` (see
:mod:`polyquant.cli.base`); importing this package imports every module in it, so adding a
command is adding one function in one module (a new module needs no other edit). A module that
fails to import is reported by name on stderr and the other commands still work."""
from __future__ import annotations

import importlib
import logging
import pkgutil

BROKEN: dict[str, str] = {}

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    try:
        importlib.import_module(f"{__name__}.{_m}")
    except Exception as _e:  # noqa: BLE001 - one broken command must not take the others down
        BROKEN[_m] = f"{type(_e).__name__}: {_e}"
        logging.getLogger("polyquant").warning("the %s commands are unavailable: %s", _m, BROKEN[_m])
