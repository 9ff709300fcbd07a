"""Run a command under the syscall filter of a systemd unit file, without systemd as PID 1.

Usage: python sandbox.py UNIT_FILE COMMAND [ARGS...]

Reads the unit's SystemCallFilter= lines (an allow list, then ``~`` lines taking groups out of
it) and SystemCallErrorNumber=, expands the groups with ``systemd-analyze syscall-filter`` (the
same tables the unit gets), installs the filter with libseccomp (the library systemd uses),
sets no_new_privs (NoNewPrivileges=) and execs COMMAND. RestrictNamespaces= is reproduced as
systemd does it (src/shared/seccomp-util.c, seccomp_restrict_namespaces): a second filter that
fails unshare(2), clone(2) and setns(2) with EPERM when their flags name a namespace type the
unit does not list, and clone3(2) with ENOSYS (its flags are out of a filter's reach, so the C
library falls back to clone). Combine with ``setpriv --bounding-set`` for
CapabilityBoundingSet=. Other sandbox options of the unit are not reproduced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

PR_SET_NO_NEW_PRIVS = 38
SCMP_ACT_ALLOW = 0x7FFF0000
# systemd.exec(5): always allowed with an allow list, whatever it names.
ALWAYS = {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}


def groups() -> dict[str, list[str]]:
    """Every @group of this systemd with its entries (syscalls and nested @groups)."""
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    table: dict[str, list[str]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.strip()
            table[current] = []
        elif line.strip() and not line.strip().startswith("#") and current:
            table[current].append(line.strip())
    return table


def expand(names: list[str], table: dict[str, list[str]]) -> set[str]:
    found: set[str] = set()
    for name in names:
        found |= expand(table[name], table) if name.startswith("@") else {name}
    return found


def unit_filter(unit: Path) -> tuple[set[str], int]:
    """The syscalls the unit allows and the errno the rest get."""
    table = groups()
    allowed: set[str] = set()
    err = errno.EPERM
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "SystemCallFilter":
            if value.startswith("~"):
                allowed -= expand(value[1:].split(), table)
            else:
                allowed |= expand(value.split(), table)
        elif key == "SystemCallErrorNumber":
            err = getattr(errno, value)
    return allowed | ALWAYS | expand(["@default"], table), err


# linux/sched.h
NAMESPACES = {
    "cgroup": 0x02000000,
    "ipc": 0x08000000,
    "net": 0x40000000,
    "mnt": 0x00020000,
    "pid": 0x20000000,
    "user": 0x10000000,
    "uts": 0x04000000,
}
SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 4, 7


class ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def unit_namespaces(unit: Path) -> set[str] | None:
    """The namespace types RestrictNamespaces= lets the unit create; None: no restriction."""
    allowed: set[str] | None = None
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "RestrictNamespaces":
            if value in ("yes", "true"):
                allowed = set()
            elif value in ("no", "false"):
                allowed = None
            elif value.startswith("~"):
                allowed = set(NAMESPACES) - set(value[1:].split())
            else:
                allowed = set(value.split())
    return allowed


def restrict_namespaces(lib: ctypes.CDLL, allowed: set[str]) -> None:
    """Load the second filter: default allow, EPERM for a namespace type not in ``allowed``."""
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    nr = {n: lib.seccomp_syscall_resolve_name(n.encode()) for n in ("unshare", "clone", "setns")}
    for name, flag in NAMESPACES.items():
        if name in allowed:
            continue
        for syscall, arg in (("unshare", 0), ("clone", 0), ("setns", 1)):
            cmp = ArgCmp(arg, SCMP_CMP_MASKED_EQ, flag, flag)
            lib.seccomp_rule_add_array(ctx, eperm, nr[syscall], 1, ctypes.byref(cmp))
    if set(NAMESPACES) - allowed:
        zero = ArgCmp(1, SCMP_CMP_EQ, 0, 0)  # setns(fd, 0): any type, so refused too
        lib.seccomp_rule_add_array(ctx, eperm, nr["setns"], 1, ctypes.byref(zero))
    clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
    if clone3 >= 0:
        lib.seccomp_rule_add(ctx, enosys, clone3, 0)
    if lib.seccomp_load(ctx) != 0:
        sys.exit("sandbox: cannot install the namespace filter")


def main() -> None:
    unit, argv = Path(sys.argv[1]), sys.argv[2:]
    allowed, err = unit_filter(unit)
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = lib.seccomp_init(0x00050000 | err)  # SCMP_ACT_ERRNO(err)
    for name in sorted(allowed):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:  # negative: not a syscall on this architecture
            lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        sys.exit("sandbox: cannot set no_new_privs")
    namespaces = unit_namespaces(unit)
    if namespaces is not None:
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(ArgCmp),
        ]
        restrict_namespaces(lib, namespaces)  # first: the allow list may refuse seccomp(2)
    if lib.seccomp_load(ctx) != 0:
        sys.exit("sandbox: cannot install the seccomp filter")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
