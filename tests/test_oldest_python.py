"""lbwatch runs on Python 3.9 (RHEL 9's), the suite on a newer one. `make test-py39` runs the
unit and integration tests on 3.9; this guard, in every run, refuses what 3.9 rejects only at
run time and a newer Python accepts: keyword arguments of the standard library that 3.10 added
(a `@dataclass(slots=True)` once kept lbwatch from importing on 3.9 at all)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Callables whose keywords 3.10 and later added: name -> keywords 3.9 does not take.
NEWER = {
    "dataclass": {"slots", "kw_only", "match_args"},
    "field": {"kw_only"},
    "zip": {"strict"},
}


def newer_keywords(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = (
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        )
        for kw in node.keywords:
            if kw.arg in NEWER.get(name, set()):
                found.append(f"line {node.lineno}: {name}({kw.arg}=...)")
    return found


def test_the_guard_finds_what_it_looks_for() -> None:
    """The control: the construct that once slipped through is found."""
    code = "@dataclass(frozen=True, slots=True)\nclass A:\n    x: int\n"
    assert newer_keywords(ast.parse(code)) == ["line 1: dataclass(slots=...)"]
    assert newer_keywords(ast.parse("zip(a, b, strict=True)")) == ["line 1: zip(strict=...)"]
    assert newer_keywords(ast.parse("@dataclass(frozen=True)\nclass A: pass\n")) == []


def test_no_keyword_python_3_9_lacks() -> None:
    bad = {
        str(path.relative_to(REPO)): found
        for path in sorted((REPO / "lbwatch").rglob("*.py"))
        if (found := newer_keywords(ast.parse(path.read_text(), str(path))))
    }
    assert not bad, bad
