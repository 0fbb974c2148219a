"""torchrun entry point for the restart test: `python -m megagen` whose rank 1 dies (SIGKILL) once.

On the first attempt (TORCHELASTIC_RESTART_COUNT=0) rank 1 kills itself right after step CRASH_AT_STEP
finished (after that step's checkpoint hook ran); restarted attempts run the plain CLI.
"""

from __future__ import annotations

import os
import signal
import sys

from megagen.checkpoint.hooks import CheckpointHook
from megagen.cli import main

CRASH_AT_STEP = int(os.environ.get("MEGAGEN_TEST_CRASH_AT_STEP", "0"))

if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ.get("RANK") == "1":
    original = CheckpointHook.__call__

    def crashing(self, trainer, steps_done):
        original(self, trainer, steps_done)
        if steps_done == CRASH_AT_STEP:
            os.kill(os.getpid(), signal.SIGKILL)

    CheckpointHook.__call__ = crashing

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
