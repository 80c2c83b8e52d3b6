"""The bad-input catalogue (tests/BAD_INPUTS.md) names only tests that exist.

Its rows name their tests as ``tests/test_FILE.py::test_name``; a renamed or deleted test would
leave a row that promises a check nobody runs. ``test_bad_inputs.py`` checks its own parametrized
entries against the older tables; this checks every named test, in every table.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

CATALOGUE = Path(__file__).with_name("BAD_INPUTS.md")
NAMED_TEST = re.compile(r"`(tests/test_[a-z0-9_]+\.py)::(test_[A-Za-z0-9_]+)`")


def defined_tests(path: Path) -> set[str]:
    """Names of the test functions defined at the top level of a test file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_test_the_catalogue_names_exists():
    text = CATALOGUE.read_text(encoding="utf-8")
    named = NAMED_TEST.findall(text)
    root = CATALOGUE.parent.parent
    missing = []
    for file, name in sorted(set(named)):
        path = root / file
        if not path.is_file() or name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"{CATALOGUE.name} names tests that do not exist: {missing}"


def test_the_hardening_section_has_a_row_with_a_test_for_each_item():
    text = CATALOGUE.read_text(encoding="utf-8")
    assert "## Hardening round 2" in text
    section = text.split("## Hardening round 2", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 10, "the hardening section lists the attacks of the hardening issue, one row each"
    for row in rows:
        assert NAMED_TEST.search(row), f"a hardening row names no test (tests/test_FILE.py::test_name): {row[:80]}"
