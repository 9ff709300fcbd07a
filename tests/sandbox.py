"""Run a command under the syscall filter of a systemd unit file, without systemd as PID 1.

Usage: python sandbox.py UNIT_FILE COMMAND [ARGS...]

Reads the unit's SystemCallFilter= lines (an allow list, then ``~`` lines taking groups out of
it) and SystemCallErrorNumber=, expands the groups with ``systemd-analyze syscall-filter`` (the
same tables the unit gets), installs the filter with libseccomp (the library systemd uses),
sets no_new_privs (NoNewPrivileges=) and the descriptor limit (LimitNOFILE=, before the filter
forbids setrlimit) and execs COMMAND. RestrictNamespaces= is reproduced as systemd does it
(src/shared/seccomp-util.c, seccomp_restrict_namespaces): a second filter that fails unshare(2),
clone(2) and setns(2) with EPERM when their flags name a namespace type the unit does not list,
and clone3(2) with ENOSYS (its flags are out of a filter's reach, so the C library falls back to
clone). What CapabilityBoundingSet= does not name leaves the bounding set (as with ``setpriv
--bounding-set``), after the mounts below, which need CAP_SYS_ADMIN.

ProtectKernelTunables= is reproduced as systemd 252 does it (src/core/namespace.c,
setup_namespace): a mount namespace of its own; the whole tree bound to a new root; there, the
MountAPIVFS= it implies (a new /proc instance), /proc/sys, /proc/sysrq-trigger and the other
entries of protect_kernel_tunables_proc_table read-only, /proc/kallsyms and /proc/kcore
inaccessible, /sys read-only with every mount under it (but /sys/fs/cgroup, which
ProtectControlGroups= governs); then the new root moved onto / and entered with chroot
(mount_move_root). The old tree stays underneath, out of sight, as it does under systemd: the
kernel lets a user namespace mount a new /proc only while some /proc in its mount namespace is
fully visible (fs/namespace.c, mount_too_revealing), and that one is. Other sandbox options of
the unit are not reproduced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import subprocess
import sys
import tempfile
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


# linux/mount.h, linux/sched.h, linux/prctl.h
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 32, 1024, 2048, 4096, 8192, 16384
MS_SLAVE, MS_RELATIME, MNT_DETACH = 1 << 19, 1 << 21, 2
CLONE_NEWNS = 0x00020000
PR_CAPBSET_DROP = 24
# systemd 252, src/core/namespace.c: protect_kernel_tunables_proc_table and _sys_table.
TUNABLES_READ_ONLY = (
    "/proc/acpi",
    "/proc/apm",
    "/proc/asound",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/latency_stats",
    "/proc/mtrr",
    "/proc/scsi",
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/timer_stats",
    "/sys",
    "/sys/fs/bpf",
    "/sys/kernel/debug",
    "/sys/kernel/tracing",
)
TUNABLES_INACCESSIBLE = ("/proc/kallsyms", "/proc/kcore")
TUNABLES_LEFT = ("/sys/fs/cgroup", "/sys/fs/selinux")  # READWRITE_IMPLICIT: as they are
MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}


def unit_says(unit: Path, key: str) -> bool:
    values = [v for k, _, v in (line.partition("=") for line in unit.read_text().splitlines())
              if k == key]  # fmt: skip
    return bool(values) and values[-1] in ("yes", "true", "on", "1")


def _mount(libc: ctypes.CDLL, src: str | None, dst: str, fs: str | None, flags: int) -> None:
    enc = [None if x is None else x.encode() for x in (src, dst, fs)]
    if libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        sys.exit(f"sandbox: mount {src} on {dst}: {os.strerror(err)}")


def _mounts_under(top: str) -> list[tuple[str, int]]:
    """Mount points at or below ``top`` (this namespace's /proc/self/mountinfo, in order), each
    with its flags other than read-only."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")  # \040 for a space
        if point == top or point.startswith(top.rstrip("/") + "/"):
            flags = sum(MOUNT_FLAGS.get(o, 0) for o in fields[5].split(","))
            found.append((point, flags))
    return found


def protect_kernel_tunables(libc: ctypes.CDLL) -> None:
    """ProtectKernelTunables=, as setup_namespace() lays it out (module docstring)."""
    cwd = os.getcwd()
    if libc.unshare(CLONE_NEWNS) != 0:
        sys.exit(f"sandbox: unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    _mount(libc, None, "/", None, MS_SLAVE | MS_REC)
    root = tempfile.mkdtemp(prefix="lbwatch-unit-root-")  # systemd: /run/systemd/unit-root
    _mount(libc, "/", root, None, MS_BIND | MS_REC)
    for point, _ in reversed(_mounts_under(f"{root}/proc")):  # MountAPIVFS=: a new /proc
        libc.umount2(point.encode(), MNT_DETACH)
    _mount(libc, "proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in TUNABLES_READ_ONLY:
        inside = root + path
        if os.path.lexists(inside) and not os.path.ismount(inside):
            _mount(libc, inside, inside, None, MS_BIND)
    fd, empty = tempfile.mkstemp(prefix="lbwatch-unit-inaccessible-")  # /run/systemd/inaccessible
    os.close(fd)
    os.chmod(empty, 0)
    for path in TUNABLES_INACCESSIBLE:
        if os.path.lexists(root + path):
            _mount(libc, empty, root + path, None, MS_BIND)
            _mount(libc, None, root + path, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    os.unlink(empty)
    left = tuple(root + p for p in TUNABLES_LEFT)
    done: set[str] = set()
    for path in TUNABLES_READ_ONLY:  # each with what is mounted below it (make_read_only)
        for point, flags in _mounts_under(root + path):
            if point in done or any(point == p or point.startswith(p + "/") for p in left):
                continue
            done.add(point)
            _mount(libc, None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)
    os.chdir(root)  # mount_move_root()
    _mount(libc, root, "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    os.rmdir(root)  # the new root's own mount point, an empty directory in its /tmp
    os.chdir(cwd)


def drop_bounding_set(libc: ctypes.CDLL, names: list[str]) -> None:
    """CapabilityBoundingSet=: every capability but ``names`` out of the bounding set."""
    libcap = ctypes.CDLL("libcap.so.2")
    keep = set()
    for name in names:
        value = ctypes.c_int()
        if libcap.cap_from_name(name.encode(), ctypes.byref(value)) != 0:
            sys.exit(f"sandbox: unknown capability {name}")
        keep.add(value.value)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        if cap not in keep and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            sys.exit(f"sandbox: cannot drop capability {cap} from the bounding set")


def main() -> None:
    unit, argv = Path(sys.argv[1]), sys.argv[2:]
    allowed, err = unit_filter(unit)
    nofile = unit_nofile(unit)
    libc = ctypes.CDLL(None, use_errno=True)
    if unit_says(unit, "ProtectKernelTunables"):
        protect_kernel_tunables(libc)
    if nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
    caps = [v.split() for k, _, v in (ln.partition("=") for ln in unit.read_text().splitlines())
            if k == "CapabilityBoundingSet"]  # fmt: skip
    if caps:
        drop_bounding_set(libc, caps[-1])
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
