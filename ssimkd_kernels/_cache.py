"""The package's cache folder, shared by the synthetic datasets (distill/) and first-use builds of the
C++ extension (_extension.py)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$SSIMKD_CACHE when set, else $XDG_CACHE_HOME/ssimkd, else ~/.cache/ssimkd."""
    if os.environ.get("SSIMKD_CACHE"):
        return Path(os.environ["SSIMKD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssimkd"
