"""Run a command under the syscall filter of a systemd unit file, without systemd as PID 1.

Usage: python sandbox.py UNIT_FILE COMMAND [ARGS...]

Reads the unit's SystemCallFilter= lines (an allow list, then ``~`` lines taking groups out of
it) and SystemCallErrorNumber=, expands the groups with ``systemd-analyze syscall-filter`` (the
same tables the unit gets), installs the filter with libseccomp (the library systemd uses),
sets no_new_privs (NoNewPrivileges=) and the descriptor limit (LimitNOFILE=, before the filter
forbids setrlimit) and execs COMMAND. Combine with ``setpriv --bounding-set`` for
CapabilityBoundingSet=. Other sandbox options of the unit are not reproduced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
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


def unit_nofile(unit: Path) -> tuple[int, int] | None:
    """The unit's LimitNOFILE= as (soft, hard): "N" is both, "N:M" each; None without one."""
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "LimitNOFILE":
            soft, _, hard = value.partition(":")
            return int(soft), int(hard or soft)
    return None


def main() -> None:
    unit, argv = Path(sys.argv[1]), sys.argv[2:]
    allowed, err = unit_filter(unit)
    nofile = unit_nofile(unit)
    if nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
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
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or lib.seccomp_load(ctx) != 0:
        sys.exit("sandbox: cannot install the seccomp filter")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
