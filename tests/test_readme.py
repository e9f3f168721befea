"""README.md: every test its guarantees table names exists (the table drifted from the tests before)."""

import re

from tests.conftest import REPO_ROOT

ABBREVIATIONS = {"fi": "test_fault_injection"}


def test_every_test_the_guarantees_table_names_exists():
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme[readme.index("## What we guarantee"):readme.index("## Layout")]
    named = re.findall(r"`(\w+)::(\w+)`", table)
    assert len(named) > 20
    missing = []
    for module, test in named:
        source = (REPO_ROOT / "tests" / f"{ABBREVIATIONS.get(module, module)}.py").read_text()
        if not re.search(rf"^def {test}\(", source, flags=re.MULTILINE):
            missing.append(f"{module}::{test}")
    assert not missing, f"README names tests that do not exist: {missing}"
