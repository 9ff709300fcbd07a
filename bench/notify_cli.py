"""`lbwatch notify INSTANCE VI_1 MASTER 100` as keepalived runs it (the installed console script,
a fresh process per call), wall time per call, against a fake running agent: this process holds
the agent's lock with the agent's own function and reads the FIFO, checking that every call
delivered its line. Baselines in the same run, interleaved call by call so that the machine's
noise falls on all of them alike: `python -c pass` on the same interpreter, and the full command
line, reached with `notify -- WORDS` (argparse reads it as `notify WORDS`, the hand-off leaves it
alone), with the agent running and with none (it then routes and spools the message itself).

Bytecode is cached as an installed package has it (pip compiles on install), in a directory of
the run's own (PYTHONPYCACHEPREFIX), even where PYTHONDONTWRITEBYTECODE is set, as on the test
machines: compiling lbwatch's modules on every call would be measured otherwise.

    .venv/bin/python bench/notify_cli.py --runs 30
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbwatch.notify.fifo import FifoReader
from lbwatch.status import lock_run_dir

EVENT = ["INSTANCE", "VI_1", "MASTER", "100"]
LINE = b'SCRIPT INSTANCE "VI_1" MASTER 100\n'


def write_config(path: Path, run_dir: Path, fifo: Path, state_dir: Path) -> None:
    q = json.dumps
    path.write_text(
        f"[agent]\nrun_dir = {q(str(run_dir))}\nstate_dir = {q(str(state_dir))}\n"
        f"[notify]\nfifo = {q(str(fifo))}\nspool_max = 100000\n"
        '[notify.email]\nhost = "127.0.0.1"\nport = 2525\nsecurity = "plain"\n'
        'sender = "lb@example.org"\nto = ["ops@example.org"]\n'
    )


def drain(reader: FifoReader) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(os.read(reader.fileno(), 65536))
        except BlockingIOError:
            return b"".join(chunks)


def imports(argv: list[str], env: dict[str, str]) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    return {
        line.split("|")[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from start to exit, seen at once through a pidfd. Not subprocess.run(timeout=):
    its wait polls with sleeps doubling from 0.5 ms, so an exit is seen up to twice as late
    (a 23 ms run measured 32 ms, a 40 ms one 64 ms)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env)
    pidfd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], 60)
        elapsed = time.perf_counter() - started
    finally:
        os.close(pidfd)
    if not ready:
        proc.kill()
        proc.wait()
        raise TimeoutError(f"{argv} still running after 60 s")
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    return elapsed


def row(name: str, xs: list[float], base: float, fast: float) -> str:
    xs = sorted(xs)
    med, p90 = statistics.median(xs), xs[int(0.9 * (len(xs) - 1))]
    ms = f"{med * 1000:.1f} | {p90 * 1000:.1f}"
    return f"| {name} | {ms} | {med / base:.2f} | {med / fast:.2f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--lbwatch",
        type=Path,
        default=Path(sys.executable).parent / "lbwatch",
        help="the installed console script (default: the one beside this interpreter)",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lbwatch-bench-notify-"))
    run_dir, idle_run_dir, fifo = tmp / "run", tmp / "idle-run", tmp / "keepalived.fifo"
    run_dir.mkdir()
    idle_run_dir.mkdir()
    conf, idle_conf = tmp / "lbwatch.toml", tmp / "idle.toml"
    write_config(conf, run_dir, fifo, tmp / "state")
    write_config(idle_conf, idle_run_dir, fifo, tmp / "idle-state")  # no agent holds its lock

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    lbw = str(args.lbwatch)
    variants: dict[str, tuple[list[str], bytes]] = {
        "`python -c pass`": ([sys.executable, "-c", "pass"], b""),
        "hand-off (agent running)": ([lbw, "--config", str(conf), "notify", *EVENT], LINE),
        "full path (agent running)": ([lbw, "--config", str(conf), "notify", "--", *EVENT], LINE),
        "full path (no agent: spools)": ([lbw, "--config", str(idle_conf), "notify", *EVENT], b""),
    }
    lock = lock_run_dir(run_dir)
    reader = FifoReader(fifo)
    reader.open()
    try:
        for argv, _ in variants.values():  # untimed: fills the bytecode cache
            subprocess.run(argv, check=True, timeout=60, env=env)
        handed = imports(variants["hand-off (agent running)"][0], env)
        full = imports(variants["full path (agent running)"][0], env)
        drain(reader)
        if "lbwatch.config" in handed or "lbwatch.config" not in full:
            print("the hand-off did not run as measured here; not timing", file=sys.stderr)
            return 1
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, (argv, expect) in variants.items():
                times[name].append(timed(argv, env))
                got = drain(reader)
                if got != expect:
                    print(f"{name}: the FIFO got {got!r}, not {expect!r}", file=sys.stderr)
                    return 1
        # The untimed round's included.
        spooled = len(list((tmp / "idle-state" / "spool").glob("*.email.json")))
    finally:
        reader.close()
        os.close(lock)

    base = statistics.median(times["`python -c pass`"])
    fast = statistics.median(times["hand-off (agent running)"])
    print(
        f"{args.runs} runs each, interleaved; Python {sys.version.split()[0]} ({sys.executable}); "
        f"{lbw}; load average {os.getloadavg()[0]:.2f}; {spooled} messages spooled by the "
        "no-agent runs\n"
    )
    print("| variant | median ms | p90 ms | median / `python -c pass` | median / hand-off |")
    print("|---|---:|---:|---:|---:|")
    for name, xs in times.items():
        print(row(name, xs, base, fast))
    return 0


if __name__ == "__main__":
    sys.exit(main())
