"""Counting XLA compilations (a program compiled inside a loop or per request
is a bug the wall clock hides on a warm cache and shows on a cold one), and
JAX's persistent compilation cache, which the command lines turn on so that a
program compiled once is read back on the next run (as MaxText does)."""

from __future__ import annotations

import logging
import os

import jax
import jax.monitoring

log = logging.getLogger(__name__)
# The cache's directory: this variable, else the user's cache directory; "" turns it off.
CACHE_ENV = "SKIPVISION_JAX_COMPILATION_CACHE"


def default_cache_dir() -> str:
    if CACHE_ENV in os.environ:
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "skipvision_jax", "jax_compilation_cache")


def enable_persistent_cache(directory: str) -> None:
    """Compiled programs are written to and read from `directory` ("" leaves
    the cache off). JAX keys an entry by the program, the backend, the
    devices and the compiler flags, so a changed program or flag misses.
    Call before the first compilation."""
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program, however quick to compile: eval.py and serve.py compile dozens of small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("compilation cache: %s", directory)


# XLA:CPU computes a bf16 product in f32 over an f32 copy of its weight, and
# its concurrency-optimized scheduler starts every independent copy early: a
# 7B prefill over bf16 weights asked for 27 GB of temporaries at once (1.6 GB
# a decoder layer). The memory-minding order makes each copy just before its
# product: 0.5 GB at any depth, at the same speed on 2 cores. XLA reads the
# flag from XLA_FLAGS when its CPU backend starts (a program's
# compiler_options do not reach the scheduler), so it is set on import.
BOUNDED_CPU_MEMORY_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def bound_cpu_memory() -> None:
    """Adds `BOUNDED_CPU_MEMORY_FLAG` to XLA_FLAGS unless the user set that
    option; takes effect if no JAX computation has run in this process yet."""
    flags = os.environ.get("XLA_FLAGS", "")
    if BOUNDED_CPU_MEMORY_FLAG.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {BOUNDED_CPU_MEMORY_FLAG}".strip()


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"


class CompileCounter:
    """Counts program builds (jax.monitoring events) while alive: `count`
    every backend compilation JAX asks for, `cache_hits` those the persistent
    cache answered (JAX times both as one backend compilation)."""

    def __init__(self):
        self.count = self.cache_hits = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, name, duration, **kwargs):
        self.count += name == BACKEND_COMPILE

    def _on_event(self, name, **kwargs):
        self.cache_hits += name == CACHE_HIT

    @property
    def compiled(self) -> int:
        """Programs XLA compiled, the cache's reads left out."""
        return self.count - self.cache_hits

    def close(self):
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)
