"""A tiny seccomp filter: no sockets but AF_UNIX, no io_uring. Built here, installed in the fork.

Our own few lines of classic BPF instead of a libseccomp binding: the filter is ten
instructions, and the server must not depend on a C library being installed.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import socket

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
_NR, _ARCH, _ARG0 = 0, 4, 16

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_X32_SYSCALL_BIT = 0x40000000

# machine -> (AUDIT_ARCH_*, __NR_socket, __NR_io_uring_setup)
_ARCHES = {
    "x86_64": (0xC000003E, 41, 425),
    "aarch64": (0xC00000B7, 198, 425),
}


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_ushort),
        ("filter", ctypes.POINTER(SockFilter)),
    ]


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    return (code, jt, jf, k)


def socket_filter_program() -> list[tuple[int, int, int, int]] | None:
    """The filter for this machine, or None where we do not know its syscall numbers."""
    arch = _ARCHES.get(platform.machine())
    if arch is None:
        return None
    audit_arch, nr_socket, nr_io_uring_setup = arch
    deny = _RET_ERRNO | errno.EPERM
    return [
        _insn(_LD_W_ABS, _ARCH),
        _insn(_JEQ_K, audit_arch, jt=1, jf=0),  # another ABI (32-bit compat): deny all
        _insn(_RET_K, deny),
        _insn(_LD_W_ABS, _NR),
        _insn(_JGE_K, _X32_SYSCALL_BIT, jt=5, jf=0),  # x32 numbers: deny
        _insn(_JEQ_K, nr_io_uring_setup, jt=4, jf=0),  # io_uring could open sockets
        _insn(_JEQ_K, nr_socket, jt=0, jf=2),
        _insn(_LD_W_ABS, _ARG0),  # socket(domain, ...): the low 32 bits of args[0]
        _insn(_JEQ_K, socket.AF_UNIX, jt=0, jf=1),
        _insn(_RET_K, _RET_ALLOW),
        _insn(_RET_K, deny),
    ]


def compile_filter() -> SockFprog | None:
    """The program as the kernel wants it; keep the result alive while it may be installed."""
    program = socket_filter_program()
    if program is None:
        return None
    array = (SockFilter * len(program))(*(SockFilter(c, jt, jf, k) for c, jt, jf, k in program))
    prog = SockFprog(len(program), ctypes.cast(array, ctypes.POINTER(SockFilter)))
    prog._array = array  # keeps the instructions alive
    return prog
