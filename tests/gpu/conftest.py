"""GPU-only tests: collected everywhere, skipped cleanly without CUDA (run by tests/gpu/run_checks.sh)."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
