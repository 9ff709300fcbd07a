"""The alerting rules users load as is (config/prometheus-rules.yml): valid for Prometheus
(`promtool check rules`), and each alert fires on the series that should fire it, not before its
`for`, and not on the ordinary case beside it (`promtool test rules`,
tests/prometheus/rules_test.yml). The metric names the rules use are the ones lbwatch exports."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from lbwatch.metrics.families import families
from lbwatch.metrics.tally import Counts
from lbwatch.statusdoc import (
    AgentInfo,
    ChannelView,
    ClusterView,
    HealthView,
    NotifyView,
    PeerDoc,
    PeerNode,
    ServiceView,
    SplitBrainView,
    StatusDoc,
    SyncView,
    VersionView,
    VipsView,
)
from tests.test_metrics import PROMTOOL

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "config" / "prometheus-rules.yml"
UNIT = ROOT / "tests" / "prometheus" / "rules_test.yml"

pytestmark = pytest.mark.skipif(
    not PROMTOOL.exists(), reason="promtool is installed by `make tools`"
)


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PROMTOOL), *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def test_the_rules_are_valid() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 12 rules found" in out.stdout


def test_each_alert_fires_when_it_should_and_only_then() -> None:
    out = promtool("test", "rules", UNIT.name, cwd=UNIT.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_broken_expectation_fails_the_unit_test(tmp_path: Path) -> None:
    """The control: promtool's unit test does fail when an alert does not fire as written."""
    text = UNIT.read_text()
    broken = text.replace('summary: "lbwatch gave up starting keepalived', 'summary: "x')
    assert broken != text
    (tmp_path / "rules.yml").write_text(RULES.read_text())
    test = tmp_path / "test.yml"
    test.write_text(broken.replace("../../config/prometheus-rules.yml", "rules.yml"))
    out = promtool("test", "rules", test.name, cwd=tmp_path)
    assert out.returncode != 0
    assert "LbwatchGaveUp" in out.stdout + out.stderr


def full_document() -> StatusDoc:
    """A status document with every part an agent can publish."""
    version = VersionView(origin="lb1", counter=3, edited=1.7e9, digest="ab" * 32)
    return StatusDoc(
        agent=AgentInfo(pid=1, start_ticks=1, create_time=1.7e9, node="lb1", version="t"),
        summary="ok",
        services={"haproxy": ServiceView(running=True), "keepalived": ServiceView(running=True)},
        health=HealthView(url="http://127.0.0.1:8404/health", state="up"),
        vrrp={
            "VI_1": VipsView(state="MASTER", vips=["192.0.2.100"], held=["192.0.2.100"]),
            "group:G1": VipsView(state="MASTER"),
        },
        notify=NotifyView(channels={"email": ChannelView(waiting=2, failed=1)}),
        sync=SyncView(
            file="/etc/haproxy/haproxy.cfg",
            current=version,
            peers={"lb2": PeerDoc(state="in-sync", since=1.7e9, pushes=1)},
        ),
        cluster=ClusterView(
            peers={"lb2": PeerNode(state="up", since=1.7e9)},
            split_brain=[SplitBrainView(instance="VI_1", nodes=["lb1", "lb2"], since=1.7e9)],
        ),
    )


def test_every_lbwatch_metric_the_rules_use_is_exported() -> None:
    """No rule waits on a name lbwatch never writes (a typo, a rename): the names are those of
    the metrics rendered from a document with every part."""
    used = set(re.findall(r"\blbwatch_[a-z_]+", RULES.read_text()))
    text = generate_latest(Rendered(full_document())).decode()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert used, "no metric found in the rules"
    assert used <= exported, used - exported


class Rendered(Collector):
    def __init__(self, doc: StatusDoc) -> None:
        self.doc = doc

    def collect(self) -> Iterator[Metric]:
        return families(self.doc, Counts(), 1.7e9)
