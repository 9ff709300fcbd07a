"""The confined check's user-namespace filter (lbwatch/sync/nouserns.py), judged apart from its
code: its numbers against the kernel's own headers, and its program run by a reading of classic
BPF written here (for both machines; aarch64 is one this machine cannot run)."""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from lbwatch.sync import nouserns

# ---------------------------------------------------------------------------------------------
# The numbers, against the kernel's headers (linux-libc-dev)

HEADERS = Path("/usr/include")


def defines(path: Path) -> dict[str, int]:
    """``#define NAME NUMBER`` lines of a header."""
    found = re.finditer(r"#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)", path.read_text())
    return {m[1]: int(m[2], 0) for m in found}


def audit_arch(em: str) -> int:
    """AUDIT_ARCH_* of a 64-bit little-endian machine, from linux/audit.h and linux/elf-em.h."""
    audit = defines(HEADERS / "linux/audit.h")
    return (
        defines(HEADERS / "linux/elf-em.h")[em]
        | audit["__AUDIT_ARCH_64BIT"]
        | audit["__AUDIT_ARCH_LE"]
    )


@pytest.mark.skipif(not (HEADERS / "linux/audit.h").exists(), reason="needs the kernel headers")
def test_the_numbers_are_the_kernels() -> None:
    """System call numbers, AUDIT_ARCH values and the flag are those of the kernel's headers:
    x86_64's own table and the generic one aarch64 uses."""
    generic = defines(HEADERS / "asm-generic/unistd.h")
    assert nouserns.ARCHES["aarch64"] == nouserns.Arch(
        audit=audit_arch("EM_AARCH64"),
        unshare=generic["__NR_unshare"],
        clone=generic["__NR_clone"],
        clone3=generic["__NR_clone3"],
        x32=False,
    )
    x86 = next(HEADERS.glob("*/asm/unistd_64.h"), None)
    if x86 is not None:
        table = defines(x86)
        assert nouserns.ARCHES["x86_64"] == nouserns.Arch(
            audit=audit_arch("EM_X86_64"),
            unshare=table["__NR_unshare"],
            clone=table["__NR_clone"],
            clone3=table["__NR_clone3"],
            x32=True,
        )
    assert defines(HEADERS / "linux/sched.h")["CLONE_NEWUSER"] == nouserns.CLONE_NEWUSER
    assert nouserns.program("riscv64") is None and nouserns.program("aarch64_be") is None


# ---------------------------------------------------------------------------------------------
# The program, read as the kernel reads it (linux/filter.h, Documentation/networking/filter.rst)

ALLOW = 0x7FFF0000
EPERM = 0x00050000 | errno.EPERM
ENOSYS = 0x00050000 | errno.ENOSYS


def verdict(program: bytes, nr: int, arch: int, arg0: int = 0) -> int:
    """What classic BPF ``program`` returns for one call (struct seccomp_data: int nr, u32 arch,
    u64 instruction_pointer, u64 args[6])."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    for _ in range(len(insns)):  # forward jumps only: each instruction at most once
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            acc, pc = struct.unpack_from("=I", data, k)[0], pc + 1
        elif code == 0x06:  # ret k
            return k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += 1 + (jt if taken else jf)
    raise AssertionError("ran off the end")


NEWUSER = 0x10000000
SIGCHLD = 17
# (arch, call name, first argument, verdict): the module docstring's table, for both machines.
TABLE = [
    ("native", "unshare", NEWUSER, EPERM),
    ("native", "unshare", NEWUSER | 0x00020000, EPERM),  # with a mount namespace
    ("native", "unshare", 0x00020000, ALLOW),  # a mount namespace alone
    ("native", "unshare", (1 << 32) | NEWUSER, EPERM),  # high bits set too
    ("native", "clone", NEWUSER | SIGCHLD, EPERM),
    ("native", "clone", SIGCHLD, ALLOW),  # fork
    ("native", "clone", 0x003D0F00, ALLOW),  # pthread_create's flags
    ("native", "clone3", 0, ENOSYS),
    ("native", "getpid", NEWUSER, ALLOW),  # the flag means nothing to another call
    ("foreign", "getpid", 0, EPERM),
]


@pytest.mark.parametrize("machine", sorted(nouserns.ARCHES))
@pytest.mark.parametrize(("which", "call", "arg0", "expected"), TABLE)
def test_the_programs_verdicts(
    machine: str, which: str, call: str, arg0: int, expected: int
) -> None:
    """Each machine's program refuses unshare and clone with CLONE_NEWUSER (EPERM), says clone3
    is absent (ENOSYS) and a foreign architecture's calls are refused; the rest passes."""
    arch = nouserns.ARCHES[machine]
    numbers = {"unshare": arch.unshare, "clone": arch.clone, "clone3": arch.clone3, "getpid": 39}
    audit = arch.audit if which == "native" else 0x40000003  # AUDIT_ARCH_I386
    program = nouserns.program(machine)
    assert program is not None and len(program) % 8 == 0
    assert verdict(program, numbers[call], audit, arg0) == expected


def test_x32_calls_are_refused_on_x86_64() -> None:
    """The x32 ABI's numbers (x86_64's arch value, bit 30 set) are refused, whatever the call;
    aarch64 has no such ABI."""
    program = nouserns.program("x86_64")
    assert program is not None
    x86_64 = nouserns.ARCHES["x86_64"].audit
    for nr in (0x40000000 | 272, 0x40000000 | 39, 0x40000000 | 435):
        assert verdict(program, nr, x86_64, NEWUSER) == EPERM
    assert verdict(program, 272, x86_64, 0) == ALLOW
