"""The device gate: one worker, several job slots, one timed run on the device at a time.

A worker with two slots (`farm worker --gpu N --slots 2`) starts the next candidate while the current
one trains. Each child gets the read end of a pipe as FARM_GATE_FD; the harness (prepare.py) blocks on
it after its first optimizer step, so python start-up, torch import, data loading and torch.compile
overlap the other run, while every timed step and the evaluation run alone. Turns are first come,
first served: the gate writes one byte to the next turn's pipe when the holder's child has exited.

A child that never reads its pipe (another template, a hostile candidate) is not blocked by it; the
worker still orders the turns, stops a child still running past its early-start limit before its turn
(worker/runner.py, `supervise(hold=...)`), and the wall-clock limit of a child counts from its turn,
not its spawn (`Turn.waited`).
"""

from __future__ import annotations

import collections
import os
import threading
import time


class Turn:
    """One child's place in line. `read_fd` goes to the child; `done()` when the child has exited."""

    def __init__(self, gate: DeviceGate) -> None:
        self._gate = gate
        self.read_fd, self._write_fd = os.pipe()
        os.set_inheritable(self.read_fd, True)
        self.created = time.monotonic()
        self.opened_at: float | None = None
        self.finished = False

    @property
    def opened(self) -> bool:
        return self.opened_at is not None

    def waited(self) -> float:
        """Seconds from the turn's creation until the gate opened for it (so far, while it waits)."""
        end = self.opened_at if self.opened_at is not None else time.monotonic()
        return max(0.0, end - self.created)

    def wait_open(self, timeout: float | None = None) -> bool:
        """Block until the gate is open for this turn (an exclusive start spawns only then)."""
        with self._gate._cv:
            return self._gate._cv.wait_for(lambda: self.opened, timeout=timeout)

    def close_child_end(self) -> None:
        """The worker's copy of the child's end, once the child has it (or never will)."""
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    def done(self) -> None:
        """The child exited (or never started): hand the device to the next turn."""
        self._gate._finish(self)

    def _open(self) -> None:  # under the gate's lock
        self.opened_at = time.monotonic()
        try:
            os.write(self._write_fd, b"g")
        except OSError:  # the child is gone already; nothing to tell it
            pass
        self._close_write()

    def _close_write(self) -> None:
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1


class DeviceGate:
    """First come, first served turns on one device (see the module docstring)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._holder: Turn | None = None
        self._line: collections.deque[Turn] = collections.deque()

    def turn(self) -> Turn:
        t = Turn(self)
        with self._cv:
            self._line.append(t)
            self._advance()
        return t

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._holder is not None

    def _finish(self, t: Turn) -> None:
        with self._cv:
            if t.finished:
                return
            t.finished = True
            if self._holder is t:
                self._holder = None
            elif t in self._line:
                self._line.remove(t)
            t._close_write()
            t.close_child_end()
            self._advance()

    def _advance(self) -> None:  # under the lock
        if self._holder is None and self._line:
            self._holder = self._line.popleft()
            self._holder._open()
        self._cv.notify_all()
