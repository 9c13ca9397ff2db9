"""glibc malloc settings for training processes.

With glibc's defaults a training process hands the memory of every step's activations back to the OS and
page-faults it back in on the next step: the recipe's refit on plantvillage-mini trained for 674 s instead of 442 s
on a 2-core machine (reports/profiling.md, finding 4). malloc reads these variables once, at process start, so a
command that trains re-executes itself with them (:func:`reexec_with_malloc_env`); the Makefile, ``tasks.py`` and
the training image set them too. Settings a user has exported are kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

MALLOC_ENV = {
    # Never serve a large allocation from its own mmap (which is unmapped again on free) ...
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    # ... never trim freed memory at the top of the heap back to the OS ...
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    # ... and grow the heap in 1 GiB steps.
    "MALLOC_TOP_PAD_": "1073741824",
}


def reexec_with_malloc_env(argv: Sequence[str] | None = None) -> None:
    """Re-execute this process (``argv``, default ``sys.argv`` run by this interpreter) with :data:`MALLOC_ENV`
    unless every variable is already set; returns only when nothing had to change."""
    if all(key in os.environ for key in MALLOC_ENV):
        return
    argv = [sys.executable, *(sys.argv if argv is None else argv)]
    os.execve(sys.executable, argv, {**MALLOC_ENV, **os.environ})
