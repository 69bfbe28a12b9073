"""A claim's holder: a process on this host that has ended is gone at once; one on another host never is."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace

from pistream.lake.holder import Holder, gone, process_start_ticks, this_process


def test_a_running_process_is_not_gone_and_an_ended_one_is():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        holder = Holder(socket.gethostname(), child.pid, process_start_ticks(child.pid))
        assert not gone(holder)
    finally:
        child.communicate(b"", timeout=60)
    assert gone(holder)


def test_this_process_is_not_gone_and_a_reused_pid_is_told_apart():
    me = this_process("writer")
    assert not gone(me)
    if me.start_ticks is not None:  # Linux: same pid, other start time = another process
        assert gone(replace(me, pid=os.getppid(), start_ticks=me.start_ticks + 12345))


def test_a_holder_on_another_host_is_never_gone_here():
    assert not gone(Holder("another-host.example", 999_999_999))


def test_holders_read_back_from_text_and_records():
    me = this_process("scheduler")
    assert Holder.from_dict(me.to_dict()) == me
    assert Holder.parse(me.text()) == replace(me, start_ticks=None)
    assert Holder.parse("garbage") is None and Holder.from_dict({"host": "h"}) is None
