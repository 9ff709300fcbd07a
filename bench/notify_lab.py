"""lbwatch's MASTER mail against keepalived's own (`smtp_alert`) in the two-node lab (root).

Both nodes run keepalived with `notify_fifo` to lbwatch and `smtp_alert` to the same real SMTP
server (aiosmtpd on the backend host), lbwatch mailing there too. Each round kills haproxy on
lb1: lb2 becomes MASTER, then lb1 takes the VIP back. For each of these MASTER transitions the
bench takes the server's acceptance time of lbwatch's mail minus that of keepalived's mail of
the same transition: the baseline is keepalived itself, in the same run. Negative: lbwatch's
mail arrived first. Measured with a new SMTP connection per mail (`keep_open = 0`, as for a
failover after a quiet hour) and with the default kept connection, a fresh lab each.

    sudo .venv/bin/python bench/notify_lab.py --rounds 5
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab.netlab import BACKEND, Lab, Node, notify_toml
from tests.util import wait_for

PORT = 2525


def mails(maildir: Path) -> list[tuple[str, float]]:
    """(subject, accepted at) of every accepted message, in order."""
    out = []
    for path in sorted(maildir.glob("*.eml")):
        meta = path.with_suffix(".json")
        if not meta.exists():
            continue  # being written
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        out.append((str(msg["Subject"]), float(json.loads(meta.read_text())["accepted"])))
    return out


def master_mails(maildir: Path, node: str) -> tuple[list[float], list[float]]:
    """Acceptance times of keepalived's and of lbwatch's mails saying ``node`` is MASTER."""
    ka, lw = [], []
    for subject, at in mails(maildir):
        if subject.startswith(f"[{node}]") and "Entering MASTER" in subject:
            ka.append(at)
        elif subject.startswith(f"[lbwatch] {node}: VI_1") and "MASTER (priority" in subject:
            lw.append(at)
    return ka, lw


def both_up(node: Node) -> bool:
    doc = node.status()
    return doc is not None and doc.ready and all(v.running for v in doc.services.values())


def wait_master_mails(maildir: Path, node: str, ka_n: int, lw_n: int) -> float:
    """Wait for one more mail of each kind about ``node``: lbwatch's minus keepalived's time."""

    def arrived() -> bool:
        ka, lw = master_mails(maildir, node)
        return len(ka) > ka_n and len(lw) > lw_n

    try:
        wait_for(arrived, 30, what=f"both MASTER mails of {node}")
    except TimeoutError:
        print("mail so far:", [s for s, _ in mails(maildir)], file=sys.stderr)
        raise
    ka, lw = master_mails(maildir, node)
    return lw[ka_n] - ka[ka_n]


def run(keep_open: float, rounds: int) -> dict[str, list[float]]:
    notify = notify_toml(
        PORT,
        # every failover of the bench is mailed, none held for a flap digest
        notify="flap_max = 1000\n",
        email=f"keep_open = {keep_open}\n",
    )
    diffs: dict[str, list[float]] = {"lb2": [], "lb1": []}
    with Lab() as lab:
        maildir = lab.start_smtp_sink(PORT)
        lb1, lb2 = lab.nodes["lb1"], lab.nodes["lb2"]
        for node in (lb1, lb2):
            node.write_configs(
                keepalived_notify="fifo", lbwatch_extra=notify, smtp_alert=f"{BACKEND} {PORT}"
            )
            node.start_lbwatch()
        wait_for(lambda: both_up(lb1) and both_up(lb2), 30, what="both nodes up")
        wait_for(lb1.has_vip, 30, what="lb1 MASTER")
        wait_master_mails(maildir, "lb1", 0, 0)  # the start: not measured
        for _ in range(rounds):
            ka1, lw1 = master_mails(maildir, "lb1")
            ka2, lw2 = master_mails(maildir, "lb2")
            lb1.kill("haproxy")
            diffs["lb2"].append(wait_master_mails(maildir, "lb2", len(ka2), len(lw2)))
            diffs["lb1"].append(wait_master_mails(maildir, "lb1", len(ka1), len(lw1)))
            wait_for(lambda: both_up(lb1) and lb1.has_vip(), 30, what="lb1 healed")
            # haproxy up longer than the lab's stable_after (5 s): its restart count is reset,
            # so the next kill is not taken for a crash loop.
            time.sleep(6)
        for node in (lb1, lb2):
            if node.log_text().count("Traceback"):
                print(f"----- lbwatch log of {node.name} -----\n{node.log_text()}")
    return diffs


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return (
        f"median {statistics.median(xs) * 1000:+.1f} ms, min {xs[0] * 1000:+.1f} ms, "
        f"max {xs[-1] * 1000:+.1f} ms ({sum(x <= 0 for x in xs)} of {len(xs)} no later)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    fresh = run(0, args.rounds)
    kept = run(30, args.rounds)
    print(f"MASTER mail, lbwatch minus keepalived smtp_alert: {args.rounds} failovers each")
    print()
    print("| lbwatch SMTP connection | MASTER by | lbwatch's mail accepted minus keepalived's |")
    print("|---|---|---|")
    for what, diffs in (("new per mail (keep_open = 0)", fresh), ("kept (default)", kept)):
        print(f"| {what} | failover (lb2) | {ms(diffs['lb2'])} |")
        print(f"| {what} | taking back (lb1) | {ms(diffs['lb1'])} |")
        print(f"| {what} | both | {ms(diffs['lb1'] + diffs['lb2'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
