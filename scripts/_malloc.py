"""glibc malloc settings for the benchmark scripts (the same values as the Makefile exports).

glibc otherwise hands freed memory back to the OS after every training step and page-faults it back in; malloc
reads these variables at start-up only, so a script re-executes itself once with them set.
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}


def reexec_with_malloc_env() -> None:
    """Re-execute the running script with :data:`MALLOC_ENV` unless every variable is already set."""
    if any(key not in os.environ for key in MALLOC_ENV):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
