"""How long PyTorch's OpenMP threads spin after a parallel op, set before torch is first imported.

Why: the native kernels run on their own thread pool (models/native/csrc/pool.h), while the torch
ops around them (a one-hot or softmax over a 150k vocabulary, the dense path's matmuls) run on
libgomp's. After each parallel region libgomp's threads spin for GOMP_SPINCOUNT iterations
(300,000 by default: several milliseconds) on the same cores, so a native forward that follows a
torch op shares a core with a spinning thread. Measured on a 2-core AMD EPYC, one process each:
the 1.5B's native AR decode took 35.5-36.5 ms/token with the default and 31.2-31.7 with 20,000
spins (or OMP_WAIT_POLICY=PASSIVE). Not spinning at all (PASSIVE) slows the dense path instead,
whose consecutive ops find the threads asleep (SmolLM2 dense AR 20 % slower); 20,000 spins (well
under a millisecond) left it as it was. libgomp reads the setting once, when torch loads it, so it
is set here, at `import specdec`, unless the user set either variable or torch is already loaded.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "20000"
_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def bound_openmp_spin() -> bool:
    """Set GOMP_SPINCOUNT where it can still take effect; True when it did."""
    if "torch" in sys.modules or any(v in os.environ for v in _VARIABLES):
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


_hinted = False


def spin_hint() -> str | None:
    """One line (once per process) for a user whose torch was loaded with libgomp's default spin."""
    global _hinted
    if _hinted or any(v in os.environ for v in _VARIABLES):
        return None
    _hinted = True
    return ("torch was imported before specdec, so its OpenMP threads spin for milliseconds after each "
            "op and slow the native kernels (~15 % measured); import specdec first or set "
            f"GOMP_SPINCOUNT={SPIN_COUNT}")
