"""The benchmark scripts re-execute themselves with leaflens's glibc malloc settings (:mod:`leaflens.malloc`)
before anything allocates."""

from __future__ import annotations

from leaflens.malloc import reexec_with_malloc_env

__all__ = ["reexec_with_malloc_env"]
