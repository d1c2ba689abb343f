"""The seccomp filter every child runs under: a deny-list of kernel interfaces, built as BPF.

What a container without capabilities is refused (Docker's default profile) is refused
here too, with EPERM: creating namespaces (the door to a user namespace's full set of
capabilities), mounting, loading modules or BPF, keyrings, perf events, setting clocks,
and their relatives; plus sockets of any family but AF_UNIX (when the network is off),
io_uring (it could open sockets behind the filter's back) and foreign syscall ABIs.
clone3 passes its flags in memory, where a filter cannot read them: it fails with ENOSYS,
on which glibc falls back to clone, whose flags are checked.

A table of names and a small assembler whose jumps go to labels, instead of a libseccomp
binding: the Python binding is a distribution package that a virtual environment cannot
install, and the program is a few dozen instructions.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import socket
from collections.abc import Iterable

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
_NR, _ARCH, _ARG0 = 0, 4, 16

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_X32_SYSCALL_BIT = 0x40000000

# The namespace flags of clone and unshare (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
# NEWPID, NEWNET). CLONE_NEWTIME (0x80) is only an unshare flag: in clone's first argument
# those bits are the exit signal.
CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
CLONE_NAMESPACES |= 0x40000000
CLONE_NEWTIME = 0x00000080

# personality() values Docker's profile allows: PER_LINUX, PER_LINUX32, UNAME26 with each,
# and the query. Anything else (ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, ...) weakens the
# process's own hardening.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# Refused outright. name -> (x86_64 number, aarch64 number); None where the ABI lacks it.
DENIED: dict[str, tuple[int | None, int | None]] = {
    # namespaces and mounts
    "setns": (308, 268),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "mount_setattr": (442, 442),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "move_mount": (429, 429),
    "open_tree": (428, 428),
    "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265),
    # kernel code and kernel objects
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "create_module": (174, None),
    "get_kernel_syms": (177, None),
    "query_module": (178, None),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "lookup_dcookie": (212, 18),
    "fanotify_init": (300, 262),
    # the machine's state
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "syslog": (103, 116),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "clock_adjtime": (305, 266),
    "adjtimex": (159, 171),
    "sethostname": (170, 161),
    "setdomainname": (171, 162),
    "vhangup": (153, 58),
    "iopl": (172, None),
    "ioperm": (173, None),
    # obsolete interfaces nobody's code needs
    "uselib": (134, None),
    "ustat": (136, None),
    "sysfs": (139, None),
    "_sysctl": (156, None),
    "nfsservctl": (180, 42),
    # io_uring does I/O (sockets included) without syscalls a filter could see
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
}

# Checked by their arguments: name -> (x86_64, aarch64).
CHECKED: dict[str, tuple[int, int]] = {
    "clone": (56, 220),
    "clone3": (435, 435),
    "unshare": (272, 97),
    "personality": (135, 92),
    "socket": (41, 198),
}

# machine -> (AUDIT_ARCH_*, index into the number tables above)
_ARCHES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}

# Relaxed for bubblewrap, which sets up its sandbox with these after our filter is in place.
BWRAP_NEEDS = frozenset({"mount", "umount2", "pivot_root", "setns"})

Insn = tuple[int, int, int, int]  # (code, jt, jf, k)


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


class _Assembler:
    """Classic BPF with named jump targets; offsets are computed when the program is done."""

    def __init__(self) -> None:
        self._insns: list[tuple[int, int | str, int | str, int]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self._labels[name] = len(self._insns)

    def load(self, offset: int) -> None:
        self._insns.append((_LD_W_ABS, 0, 0, offset))

    def ret(self, value: int) -> None:
        self._insns.append((_RET_K, 0, 0, value))

    def jump(self, code: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        """A conditional jump; 0 means the next instruction, a string names a label."""
        self._insns.append((code, jt, jf, k))

    def program(self) -> list[Insn]:
        out = []
        for i, (code, jt, jf, k) in enumerate(self._insns):
            out.append((code, self._offset(i, jt), self._offset(i, jf), k))
        return out

    def _offset(self, at: int, target: int | str) -> int:
        if isinstance(target, int):
            return target
        offset = self._labels[target] - at - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"jump to {target} out of range ({offset})")
        return offset


def filter_program(
    *, deny_sockets: bool, relax: Iterable[str] = (), machine: str | None = None
) -> list[Insn] | None:
    """The filter for this machine, or None where we do not know its syscall numbers.

    `deny_sockets`: refuse sockets other than AF_UNIX. `relax`: names of DENIED to let
    through (what bubblewrap needs to build its sandbox; it then adds its own filter).
    """
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    audit_arch, column = arch
    relaxed = set(relax)
    eperm = _RET_ERRNO | errno.EPERM
    nr = {name: numbers[column] for name, numbers in CHECKED.items()}
    asm = _Assembler()
    asm.load(_ARCH)
    asm.jump(_JEQ_K, audit_arch, jf="deny")  # another ABI (32-bit compat): refuse all
    asm.load(_NR)
    asm.jump(_JGE_K, _X32_SYSCALL_BIT, jt="deny")  # x32 numbers
    for name, numbers in DENIED.items():
        number = numbers[column]
        if number is not None and name not in relaxed:
            asm.jump(_JEQ_K, number, jt="deny")
    asm.jump(_JEQ_K, nr["clone3"], jt="enosys")
    if not relaxed:
        asm.jump(_JEQ_K, nr["clone"], jt="clone")
        asm.jump(_JEQ_K, nr["unshare"], jt="unshare")
    asm.jump(_JEQ_K, nr["personality"], jt="personality")
    if deny_sockets:
        asm.jump(_JEQ_K, nr["socket"], jt="socket")
    asm.ret(_RET_ALLOW)
    # The first argument's low 32 bits: flags, persona and domain are all ints.
    asm.label("clone")
    asm.load(_ARG0)
    asm.jump(_JSET_K, CLONE_NAMESPACES, jt="deny")
    asm.ret(_RET_ALLOW)
    asm.label("unshare")
    asm.load(_ARG0)
    asm.jump(_JSET_K, CLONE_NAMESPACES | CLONE_NEWTIME, jt="deny")
    asm.ret(_RET_ALLOW)
    asm.label("personality")
    asm.load(_ARG0)
    for value in PERSONALITIES:
        asm.jump(_JEQ_K, value, jt="allow")
    asm.ret(eperm)
    asm.label("socket")
    asm.load(_ARG0)
    asm.jump(_JEQ_K, socket.AF_UNIX, jt="allow")
    asm.label("deny")
    asm.ret(eperm)
    asm.label("enosys")
    asm.ret(_RET_ERRNO | errno.ENOSYS)
    asm.label("allow")
    asm.ret(_RET_ALLOW)
    return asm.program()


def compile_filter(*, deny_sockets: bool, relax: Iterable[str] = ()) -> SockFprog | None:
    """The program as the kernel wants it; keep the result alive while it may be installed."""
    program = filter_program(deny_sockets=deny_sockets, relax=relax)
    if program is None:
        return None
    array = (SockFilter * len(program))(*(SockFilter(c, jt, jf, k) for c, jt, jf, k in program))
    prog = SockFprog(len(program), ctypes.cast(array, ctypes.POINTER(SockFilter)))
    prog._array = array  # keeps the instructions alive
    return prog


def filter_bytes(prog: SockFprog) -> bytes:
    """The instructions as bytes (bubblewrap's --seccomp reads them from a descriptor)."""
    return ctypes.string_at(prog.filter, prog.len * ctypes.sizeof(SockFilter))
