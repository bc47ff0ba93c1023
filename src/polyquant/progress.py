"""Progress bars (tqdm) that name the current item and show an ETA; silent when disabled."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str = "", total: int | None = None, enabled: bool = True, **kw) -> tqdm:
    return tqdm(items, desc=desc, total=total, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False, **kw)
