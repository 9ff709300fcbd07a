"""What confining the check of a received version costs: ``haproxy -c`` as lbwatch ran it before
(root, unconfined) against the confined check (prlimit, setpriv, bubblewrap: sync/sandbox.py), on
the same config, interleaved so that both see the same load; then each layer alone. Root.

    sudo .venv/bin/python bench/confine.py --runs 40

Medians and the ratio to the unconfined check of the same run; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import pwd
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbwatch.config import Config
from lbwatch.events import Outcome
from lbwatch.services import run_command
from lbwatch.sync import sandbox
from lbwatch.sync.confine import confine_for
from tests.lab.netlab import haproxy_cfg

CHECK = ["haproxy", "-c", "-f", "{file}"]


def timed(f: Callable[[], object]) -> float:
    started = time.perf_counter()
    f()
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        Path(tmp).chmod(0o755)  # as /etc/haproxy: the check user walks to the live file
        cfg = Path(tmp) / "haproxy.cfg"
        content = haproxy_cfg("bench").encode()
        cfg.write_bytes(content)
        confine = confine_for(Config(), cfg, [cfg])
        assert confine.sandbox is not None
        settings = confine.sandbox
        plain = [str(cfg) if a == "{file}" else a for a in CHECK]
        # As the check counts them: what the user runs already (another lab's haproxy, say),
        # plus the spare; the spare alone would fail the chains whenever that is above it.
        tasks = sandbox.tasks_of(pwd.getpwnam(settings.user).pw_uid) + sandbox.SPARE_TASKS
        layers: dict[str, Callable[[], object]] = {
            "unconfined (before)": lambda: run_command(plain, 30),
            "confined (now)": lambda: confine.check(CHECK, cfg, {cfg: content}, 30),
            "choom + prlimit + haproxy -c": lambda: run_command(
                sandbox.argv(plain, settings, {}, None, tasks, seccomp=None)[:11] + plain, 30
            ),
        }
        bare = sandbox.argv(plain, settings, {}, None, tasks, seccomp=None)
        layers["bubblewrap chain, no filter"] = lambda: run_command(bare, 30, env=sandbox.ENV)
        layers["bubblewrap chain, no copies"] = lambda: sandbox.confined(
            plain, settings, {}, None, tasks, 30
        )
        for name, f in layers.items():  # each one works, or its time would mean nothing
            out = f()
            ok = getattr(out, "ok", None) or getattr(out, "outcome", None) is Outcome.OK
            assert ok, (name, out)
        times: dict[str, list[float]] = {k: [] for k in layers}
        for _ in range(args.runs):
            for name, f in layers.items():
                times[name].append(timed(f))
    base = statistics.median(times["unconfined (before)"])
    print(f"haproxy -c of the lab's config, {args.runs} runs each, interleaved:")
    for name, xs in times.items():
        med = statistics.median(xs)
        print(
            f"  {name:<30} median {med * 1000:6.1f} ms  (+{(med - base) * 1000:5.1f} ms, "
            f"{med / base:.2f}x)  min {min(xs) * 1000:.1f}  max {max(xs) * 1000:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
