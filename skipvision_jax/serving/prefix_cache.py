"""The server's cache of prompt prefixes (vLLM's automatic prefix caching,
at the granularity of LLaVA's prompt: the text before the image and the
visual block): each prefix's forward, kept on the device under a byte limit
and dropped least recently used first. Keys name what makes a prefix's
forward: its image's pixels, its text ids, its layout and KV setting."""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Hashable

import jax
import numpy as np


def prefix_key(setting: Hashable, pixels: np.ndarray, prefix_ids: np.ndarray) -> tuple:
    """A prefix's key: its setting (KV policy, layout), a hash of its
    image's pixels (as the model sees them) and its text ids."""
    image = hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).hexdigest()
    return (setting, image, np.asarray(prefix_ids, np.int32).tobytes())


def tree_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


class PrefixCache:
    """Least recently used first out, holding at most `limit_bytes` (an
    entry larger than that is never held); counts hits, misses, evictions."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self._entries: collections.OrderedDict[tuple, tuple[object, int]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def lookup(self, keys: list[tuple]) -> tuple[dict[tuple, object], list[tuple]]:
        """(the entries held for `keys`, now the most recently used; the
        distinct keys missing, in order). A request (a key) hits when its
        prefix needs no forward of its own: held, or missing for an earlier
        request of the same batch, which computes it once for both."""
        found, missing = {}, {}
        for key in keys:
            if key in found or key in missing:
                self.hits += 1
            elif key in self._entries:
                self.hits += 1
                self._entries.move_to_end(key)
                found[key] = self._entries[key][0]
            else:
                self.misses += 1
                missing[key] = None
        return found, list(missing)

    def put(self, key: tuple, entry) -> None:
        size = tree_bytes(entry)
        if size > self.limit_bytes:
            return
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        self._entries[key] = (entry, size)
        self.bytes += size
        while self.bytes > self.limit_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1

    def stats(self) -> dict:
        return {
            "prefix_hits": self.hits,
            "prefix_misses": self.misses,
            "prefix_evictions": self.evictions,
            "prefix_entries": len(self._entries),
            "prefix_bytes": self.bytes,
            "prefix_limit_bytes": self.limit_bytes,
        }
