"""Make ``import benchmarks`` and ``import fusedlr`` work from a checkout, whatever pytest's import mode."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
