"""The guarantees page (docs/guarantees.md): every test it names exists (the table drifted from the tests before).

A test is named `<file>::<test>`: the function `<test>` in `tests/**/<file>.py`, wherever under tests/ the file
lives (the test folders mirror the code's wings; file names are unique). The README's short table links each
group of guarantees to its section of that page.
"""

import re

from tests.conftest import REPO_ROOT

GUARANTEES = REPO_ROOT / "docs" / "guarantees.md"


def _test_files() -> dict:
    """Test file name without .py -> its paths under tests/ (one, as names are unique)."""
    files = {}
    for path in sorted((REPO_ROOT / "tests").rglob("test_*.py")):
        files.setdefault(path.stem, []).append(path)
    return files


def test_test_file_names_are_unique_so_a_name_finds_its_file():
    duplicates = {name: [str(path.relative_to(REPO_ROOT)) for path in paths]
                  for name, paths in _test_files().items() if len(paths) > 1}
    assert not duplicates, f"two test files of one name: {duplicates}"


def test_every_test_the_guarantees_page_names_exists():
    named = re.findall(r"`(\w+)::(\w+)`", GUARANTEES.read_text())
    assert len(named) > 20
    files = _test_files()
    missing = []
    for module, test in named:
        if module not in files:
            missing.append(f"{module}::{test} (no tests/**/{module}.py)")
        elif not re.search(rf"^def {test}\(", files[module][0].read_text(), flags=re.MULTILINE):
            missing.append(f"{module}::{test}")
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"


def test_every_guarantee_group_has_a_row_in_the_readme():
    groups = re.findall(r"^## (.+)$", GUARANTEES.read_text(), flags=re.MULTILINE)
    readme = (REPO_ROOT / "README.md").read_text()
    linked = re.findall(r"\]\(docs/guarantees\.md#([\w-]+)\)", readme)
    anchors = [re.sub(r"[^\w\- ]", "", group.lower()).replace(" ", "-") for group in groups]
    assert len(groups) >= 5
    assert linked == anchors, f"README.md's guarantees table should link each group in order: {anchors}"
