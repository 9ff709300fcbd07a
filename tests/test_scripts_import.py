"""The benchmark and the demo are not run by the suite (they need minutes), but they must at
least import: a renamed helper once broke the benchmark silently."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/failover.py imports and exposes main()."""
    spec = importlib.util.spec_from_file_location("bench_failover", REPO / "bench/failover.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules, as for any imported module.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert callable(module.main)


def test_demo_imports() -> None:
    """python -m tests.lab imports and exposes main()."""
    module = importlib.import_module("tests.lab.__main__")
    assert callable(module.main)


def test_memory_benchmark_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/memory.py imports and exposes main()."""
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "bench/memory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules, as for any imported module.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert callable(module.main)


@pytest.mark.parametrize("name", ["sync", "reload_race", "drain"])
def test_sync_benchmarks_import(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/sync.py (with its canary options), bench/reload_race.py and bench/drain.py import
    and expose main()."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / f"bench/{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert callable(module.main)


def test_splitbrain_benchmark_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/splitbrain.py imports and exposes main()."""
    spec = importlib.util.spec_from_file_location("bench_splitbrain", REPO / "bench/splitbrain.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert callable(module.main)
