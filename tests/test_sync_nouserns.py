"""The confined check's user-namespace filter (lbwatch/sync/nouserns.py), judged apart from its
code: its numbers against the kernel's own headers, its program run by a reading of classic BPF
written here (for aarch64, which this machine cannot run), and above all the kernel itself: a
probe in the real confined chain calls unshare, clone and clone3 and reports each errno, beside
the same probe in the same chain without the filter, and ordinary work (fork, exec, threads,
haproxy -c) still succeeding."""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import struct
from pathlib import Path

import pytest

from lbwatch.events import Outcome
from lbwatch.services import run_command
from lbwatch.sync import nouserns, sandbox
from tests.conftest import free_port, haproxy_config, needs

confined = needs("bwrap", "setpriv", "prlimit", "choom", "haproxy")


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


# ---------------------------------------------------------------------------------------------
# The kernel as the oracle: the filter in the real confined chain

PROBE = r"""
import ctypes, errno, json, os, subprocess, threading
# PyDLL holds the GIL through the call: the child of a raw clone goes on in Python.
libc = ctypes.PyDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
UNSHARE, CLONE, CLONE3 = {"x86_64": (272, 56, 435), "aarch64": (97, 220, 435)}[os.uname().machine]
NEWUSER, SIGCHLD = 0x10000000, 17


def call(nr, *args):
    # In a child of its own, so that a namespace it makes leaves the probe as it was.
    pid = os.fork()
    if pid == 0:
        r = libc.syscall(ctypes.c_long(nr), *map(ctypes.c_long, args))
        if r > 0:  # the parent of a clone
            os.waitpid(r, 0)
        os._exit(ctypes.get_errno() if r < 0 else 0)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return errno.errorcode.get(code, str(code)) if code else "ok"


def clone3(flags):
    args = (ctypes.c_uint64 * 8)(flags, 0, 0, 0, SIGCHLD, 0, 0, 0)  # struct clone_args, v0
    return call(CLONE3, ctypes.addressof(args), ctypes.sizeof(args))


def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return "ok" if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 else "failed"


def thread():
    done = []
    t = threading.Thread(target=done.append, args=(1,))
    t.start()
    t.join()
    return "ok" if done else "failed"


said = {
    "unshare(NEWUSER)": call(UNSHARE, NEWUSER),
    "clone(NEWUSER)": call(CLONE, NEWUSER | SIGCHLD, 0, 0, 0, 0),
    "clone3(NEWUSER)": clone3(NEWUSER),
    "clone3()": clone3(0),
    "clone()": call(CLONE, SIGCHLD, 0, 0, 0, 0),
    "fork": fork(),
    "thread": thread(),
    "exec": "ok" if subprocess.run(["true"]).returncode == 0 else "failed",
}
if UNSHARE == 272:
    said["x32 unshare(NEWUSER)"] = call(0x40000000 | UNSHARE, NEWUSER)
print("PROBE " + json.dumps(said))
"""


def probe_says(output: str) -> dict[str, str]:
    line = next((ln for ln in output.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, output
    return dict(json.loads(line[len("PROBE ") :]))


@confined
@pytest.mark.skipif(platform.machine() not in nouserns.ARCHES, reason="no filter here")
def test_the_kernel_refuses_user_namespaces_and_nothing_else(tmp_path: Path) -> None:
    """In the confined chain, unshare and clone with CLONE_NEWUSER fail with EPERM, clone3 with
    ENOSYS (x32's unshare with EPERM, where the kernel alone says ENOSYS); fork, a raw clone, a
    thread and exec work. Positive control: in the same chain without the filter the same
    probe makes user namespaces."""
    cfg = tmp_path / "haproxy.cfg"
    settings = sandbox.settings_for("haproxy", 1024, 10, [], [tmp_path])
    command = ["/usr/bin/python3", "-c", PROBE]
    filtered = probe_says(sandbox.check(command, cfg, {cfg: b"global\n"}, settings, 60).output)
    expected = {
        "unshare(NEWUSER)": "EPERM",
        "clone(NEWUSER)": "EPERM",
        "clone3(NEWUSER)": "ENOSYS",
        "clone3()": "ENOSYS",
        "clone()": "ok",
        "fork": "ok",
        "thread": "ok",
        "exec": "ok",
    }
    if platform.machine() == "x86_64":
        expected["x32 unshare(NEWUSER)"] = "EPERM"
    assert filtered == expected
    bare = sandbox.argv(command, settings, {}, None, seccomp=None)
    plain = probe_says(run_command(bare, 60, env=sandbox.ENV).output)
    assert plain["unshare(NEWUSER)"] == plain["clone(NEWUSER)"] == plain["clone3(NEWUSER)"] == "ok"
    assert plain.get("x32 unshare(NEWUSER)", "ENOSYS") in ("ENOSYS", "ok"), plain  # the kernel's


@confined
def test_a_valid_config_passes_the_filtered_check(tmp_path: Path) -> None:
    """Ordinary work under the filter: haproxy -c of a valid config (threads, a JIT-compiled
    regex) passes the confined check."""
    cfg = haproxy_config(tmp_path / "haproxy.cfg", free_port(), free_port())
    text = cfg.read_text().replace("defaults", "global\n    nbthread 4\ndefaults", 1)
    cfg.write_text(text)
    settings = sandbox.settings_for("haproxy", 1024, 10, [], [tmp_path])
    out = sandbox.check(["haproxy", "-c", "-f", "{file}"], cfg, {cfg: text.encode()}, settings, 30)
    assert out.outcome is Outcome.OK, out.output


def test_a_command_is_given_descriptors_and_lbwatch_keeps_none() -> None:
    """run_command hands ``give`` to the command at their numbers and closes its own copies."""
    r, w = os.pipe()
    os.write(w, b"handed over\n")
    os.close(w)
    out = run_command(["cat", f"/dev/fd/{r}"], 10, give=(r,))
    assert out.output == "handed over\n", out
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(r)


@confined
def test_the_filters_descriptor_is_nobodys_once_the_check_runs(tmp_path: Path) -> None:
    """The pipe the filter comes through is closed in lbwatch once the chain started, and
    bubblewrap closes its own copy: the check sees nothing but stdin, stdout and stderr."""
    cfg = tmp_path / "haproxy.cfg"
    settings = sandbox.settings_for("haproxy", 1024, 10, [], [tmp_path])
    before = sorted(os.listdir("/proc/self/fd"))
    out = sandbox.check(["ls", "/proc/self/fd"], cfg, {cfg: b"global\n"}, settings, 30)
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert out.outcome is Outcome.OK and out.output.split() == ["0", "1", "2", "3"], out.output


@needs("bwrap", "setpriv", "prlimit", "choom", "unshare")
def test_a_machine_without_a_filter_still_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a machine the module does not know the check runs without the filter (and may make
    user namespaces of its own, as the README says)."""
    monkeypatch.setattr(sandbox.platform, "machine", lambda: "riscv64")
    cfg = tmp_path / "haproxy.cfg"
    settings = sandbox.settings_for("haproxy", 1024, 10, [], [tmp_path])
    out = sandbox.check(["unshare", "--user", "true"], cfg, {cfg: b"global\n"}, settings, 30)
    assert out.outcome is Outcome.OK, out.output
