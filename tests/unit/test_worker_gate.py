"""worker/gate.py: turns on one device, first come first served, one byte down the pipe when a turn opens."""

from __future__ import annotations

import os
import threading
import time

from worker.gate import DeviceGate


def _readable(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 8)
    except BlockingIOError:
        return b""


def test_the_first_turn_opens_at_once_and_the_next_when_it_is_done():
    gate = DeviceGate()
    a = gate.turn()
    b = gate.turn()
    assert a.opened and not b.opened and gate.busy
    a_fd, b_fd = os.dup(a.read_fd), os.dup(b.read_fd)
    assert _readable(a_fd) == b"g"
    assert _readable(b_fd) == b""
    time.sleep(0.05)
    a.done()
    assert b.opened and _readable(b_fd) == b"g"
    assert b.waited() >= 0.05  # its wait ends when it opened
    w = b.waited()
    time.sleep(0.02)
    assert b.waited() == w
    b.done()
    assert not gate.busy
    assert a.read_fd == -1 and b.read_fd == -1  # the worker's copies of the child ends are closed
    os.close(a_fd)
    os.close(b_fd)


def test_a_turn_that_ends_before_it_opened_leaves_the_line():
    gate = DeviceGate()
    a, b, c = gate.turn(), gate.turn(), gate.turn()
    b.done()  # its child died while waiting
    assert not b.opened
    a.done()
    assert c.opened and not b.opened
    c.done()
    a.done()  # twice is harmless
    assert not gate.busy


def test_wait_open_blocks_until_the_holder_is_done():
    gate = DeviceGate()
    a = gate.turn()
    b = gate.turn()
    assert not b.wait_open(timeout=0.05)
    threading.Timer(0.1, a.done).start()
    assert b.wait_open(timeout=5)
    b.done()


def test_eof_reaches_a_child_whose_turn_was_given_up():
    # the worker's end is closed on done(): a child still holding its end sees EOF, never a hang
    gate = DeviceGate()
    a = gate.turn()
    b = gate.turn()
    b_fd = os.dup(b.read_fd)
    b.done()
    assert os.read(b_fd, 1) == b""
    os.close(b_fd)
    a.done()
