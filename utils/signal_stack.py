"""The calling thread's alternate signal stack (sigaltstack(2), Linux), read and put back.

Python runs its signal handlers on that stack, so a library that leaves it pointing at unmapped memory turns the next
signal into a SIGSEGV with no Python frame (deploy/openvino_runtime.py says which library and when).
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

SS_DISABLE = 2  # stack_t.ss_flags: no alternate stack
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class SignalStack(ctypes.Structure):  # stack_t of sigaltstack(2)
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def current_signal_stack() -> SignalStack | None:
    """This thread's alternate signal stack; None off Linux or where it cannot be read."""
    stack = SignalStack()
    if _LIBC is None or _LIBC.sigaltstack(None, ctypes.byref(stack)) != 0:
        return None
    return stack


@contextlib.contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Run the block and give this thread back the alternate signal stack it had before, whatever the block left
    there: a stack unmapped by then is never used."""
    kept = current_signal_stack()
    if kept is None:
        yield
        return
    kept.ss_flags &= SS_DISABLE  # drop SS_ONSTACK, a state, not a setting
    try:
        yield
    finally:
        _LIBC.sigaltstack(ctypes.byref(kept), None)
