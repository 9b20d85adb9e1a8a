"""A small in-process LRU of rendered progress plots, keyed by (program, format, chart version).

Rendering is the expensive part of the chart (2.9 s of CPU and 9.9 MB of SVG at 100k runs before the
discarded points were thinned), and every dashboard viewer asks for the same version at about the same
time, after a run finishes. One render per version serves them all: concurrent misses on one key wait
for the first render instead of starting their own. Bounded by entries and by bytes; one per app.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable


class ChartCache:
    def __init__(self, *, max_entries: int = 32, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self._gates: dict[Hashable, threading.Lock] = {}

    def _hit(self, key: Hashable) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def get(self, key: Hashable, render: Callable[[], bytes]) -> bytes:
        """The cached bytes for key, rendering them (once, however many ask at once) on a miss."""
        with self._lock:
            data = self._hit(key)
            if data is not None:
                return data
            gate = self._gates.setdefault(key, threading.Lock())
        with gate:
            try:
                with self._lock:
                    data = self._hit(key)
                if data is not None:
                    return data
                data = render()
                with self._lock:
                    self._put(key, data)
                return data
            finally:
                with self._lock:
                    if self._gates.get(key) is gate:
                        del self._gates[key]

    def _put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        old = self._items.pop(key, None)
        self._size -= len(old) if old is not None else 0
        self._items[key] = data
        self._size += len(data)
        while len(self._items) > self.max_entries or self._size > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._size -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)
