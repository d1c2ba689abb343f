"""Process attributes set between fork and exec of a child: parent death, subreaper, no_new_privs.

They have to be set by the new process itself, and the child script should not pay for
importing ctypes at every start, so the server's already-loaded libc does it in the fork.
All three survive execve.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def prepare_child() -> None:
    """Runs in the forked child before exec: keep it minimal and allocation-free."""
    # Told when the server dies, even by SIGKILL. SIGTERM, not SIGKILL: the child's handler
    # then kills its whole process group, so grandchildren do not outlive it either.
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # Orphans of user code (a shell's background job, a stopped fork loop) are re-parented
    # to the child, which can reap them, instead of to a PID 1 that may not.
    _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # No setuid binary run by user code can gain privileges.
    _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
