"""Counting XLA compilations: a program compiled inside a loop or per request
is a bug the wall clock hides on a warm cache and shows on a cold one."""

from __future__ import annotations

import jax.monitoring

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while alive."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **kwargs):
        self.count += name == BACKEND_COMPILE

    def close(self):
        jax.monitoring.unregister_event_duration_listener(self._on_event)
