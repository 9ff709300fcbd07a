"""A seccomp filter that keeps the confined check from making a user namespace of its own.

Who reaches this: code that runs in the check of a version received from a peer (``sandbox``),
that is haproxy's parser and whatever a config ``admit`` let through makes it run. In a user
namespace of its own such code would hold every capability, and with them reach the kernel's
code for mounts, netfilter, BPF and the like, where many local privilege escalations begin.
This module only builds the program: pure, no I/O.

bubblewrap loads it (``--seccomp FD``, in every version since 0.1.0) as its last step before it
execs the check, once its own namespaces are made; the filter never sees bubblewrap's own calls.
It is classic BPF over struct seccomp_data (linux/seccomp.h), which the kernel fills in for
each system call:

    offset  0   int  nr                   the call's number, in the table of ``arch``
    offset  4   u32  arch                 AUDIT_ARCH_* (linux/audit.h): the calling convention
    offset  8   u64  instruction_pointer
    offset 16   u64  args[6]              64 bits each whatever the ABI; on a little-endian
                                          machine (both below) args[0]'s low half is at 16

What it decides, in this order:

    arch is not this machine's own      EPERM, every call: a 32-bit program (i386 on x86_64,
                                        arm on aarch64) numbers its calls otherwise, and its
                                        clone and unshare would pass unseen
    x86_64, an x32 number (bit 30)      EPERM, every call: the x32 ABI shares x86_64's arch
                                        value, with numbers of its own
    clone3                              ENOSYS: its flags sit in a struct in memory, out of a
                                        filter's reach; the C library (glibc 2.34 and later)
                                        then falls back to clone, whose flags are checked
    unshare or clone with CLONE_NEWUSER EPERM: the flags are their first argument on both
                                        machines (CLONE_NEWUSER is bit 28, in the low half)
    anything else                       allowed: fork, threads, exec, and clone or unshare of
                                        any other namespace (which, without capabilities in
                                        the sandbox's namespace, the kernel refuses anyway)

Why not bubblewrap's ``--disable-userns`` (0.8): it sets user.max_user_namespaces inside the
sandbox through /proc/sys, which is read-only under the shipped unit (ProtectKernelTunables=) and
in containers (nspawn, docker, LXC), where it failed every check; and RHEL 9 and Debian 11 ship
bubblewrap 0.4, which lacks it. setns(2) is left alone: joining a user namespace takes
CAP_SYS_ADMIN in it, and the check holds none in its own and can make no other.

Only the machines below are known; on any other ``program`` is None, the check runs without the
filter and may make user namespaces of its own (README, "What a peer's version may do").
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Tuple, Union

# linux/bpf_common.h: the classic BPF instructions used here, on the accumulator A.
LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = the 32-bit word at offset k of seccomp_data
JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K: A == k
JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K: A >= k, unsigned
JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K: A & k
RET = 0x06  # BPF_RET | BPF_K: the verdict k

# linux/seccomp.h
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000  # | errno, the call's result
NR, ARCH, ARG0 = 0, 4, 16  # offsets in struct seccomp_data (above)

CLONE_NEWUSER = 0x10000000  # linux/sched.h
X32_SYSCALL_BIT = 0x40000000  # arch/x86/include/uapi/asm/unistd.h


@dataclass(frozen=True)
class Arch:
    audit: int  # AUDIT_ARCH_*: EM_* | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
    unshare: int
    clone: int
    clone3: int
    x32: bool  # numbers with X32_SYSCALL_BIT set are another ABI under the same ``audit``


# By platform.machine(). Numbers: arch/x86/entry/syscalls/syscall_64.tbl, and for aarch64 the
# generic table, include/uapi/asm-generic/unistd.h.
ARCHES = {
    "x86_64": Arch(audit=0xC000003E, unshare=272, clone=56, clone3=435, x32=True),
    "aarch64": Arch(audit=0xC00000B7, unshare=97, clone=220, clone3=435, x32=False),
}

# One step of the program: a label, or (code, k, jump if true, jump if false) with each jump a
# label or None for the next instruction.
Step = Union[str, Tuple[int, int, Optional[str], Optional[str]]]


def steps(arch: Arch) -> list[Step]:
    """The program for ``arch``, with labels (the table in the module docstring)."""
    return [
        (LD_ABS, ARCH, None, None),
        (JEQ, arch.audit, None, "refuse"),
        (LD_ABS, NR, None, None),
        *([(JGE, X32_SYSCALL_BIT, "refuse", None)] if arch.x32 else []),
        (JEQ, arch.clone3, "absent", None),
        (JEQ, arch.unshare, "flags", None),
        (JEQ, arch.clone, "flags", None),
        (RET, RET_ALLOW, None, None),
        "flags",
        (LD_ABS, ARG0, None, None),
        (JSET, CLONE_NEWUSER, "refuse", None),
        (RET, RET_ALLOW, None, None),
        "refuse",
        (RET, RET_ERRNO | errno.EPERM, None, None),
        "absent",
        (RET, RET_ERRNO | errno.ENOSYS, None, None),
    ]


def assemble(program: Sequence[Step]) -> list[tuple[int, int, int, int]]:
    """struct sock_filter fields (code, jt, jf, k) for ``program``: each jump as the number of
    instructions it skips (classic BPF jumps forward only, at most 255)."""
    at: dict[str, int] = {}  # label -> the index of the instruction after it
    n = 0
    for step in program:
        if isinstance(step, str):
            at[step] = n
        else:
            n += 1
    out: list[tuple[int, int, int, int]] = []
    for step in program:
        if isinstance(step, str):
            continue
        code, k, jt, jf = step
        here = len(out) + 1  # jumps count from the next instruction
        skip = [0 if to is None else at[to] - here for to in (jt, jf)]
        assert all(0 <= s <= 255 for s in skip), step
        out.append((code, skip[0], skip[1], k))
    return out


def program(machine: str) -> bytes | None:
    """The filter for ``machine`` (platform.machine()) as bubblewrap reads it: struct sock_filter
    (u16 code, u8 jt, u8 jf, u32 k; 8 bytes, this machine's byte order) one after the other.
    None for a machine not in ``ARCHES``."""
    arch = ARCHES.get(machine)
    if arch is None:
        return None
    return b"".join(struct.pack("=HBBI", *insn) for insn in assemble(steps(arch)))
