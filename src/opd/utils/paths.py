"""Where the checkout is: one derivation for every path opd finds beside its source."""
from __future__ import annotations

from pathlib import Path


def checkout_root() -> Path:
    """The folder holding ``src/opd`` and, beside it, ``conf/``, ``data/`` and ``models/``: three
    levels above this file (``src/opd/utils/paths.py``), whatever the working folder. A copy installed
    outside a checkout has none of those folders there; callers that must work then check for them."""
    return Path(__file__).resolve().parents[3]
