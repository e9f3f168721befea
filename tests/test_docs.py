"""The docs cannot drift from the code: the site builds strictly, and every command it shows still runs.

Every fenced code block (and every inline code span that is a whole command) of README.md, ARCHITECTURE.md,
BUILD.md and docs/*.md is read for calls of the project's entry points (`python -m <package>.<module>`,
`python benchmarks/<name>.py`, the console scripts of setup.py) and of `make`. Each `--flag` such a command
passes (or `--noflag`, for a boolean) must be a flag of that entry point, as absl knows it when the program
starts; the flags after a launcher's `--` must be the trainer's; each `make` target must be in the Makefile.
A renamed flag, a moved module or a dropped target fails here, not in a reader's shell.

One subprocess lists the flags of every entry point the docs call: it runs each module as `__main__` with
`absl.app.run` replaced by a stop, so a module's flags are whatever it defines before it would parse the command
line (at import, or in the define_flags() its run() calls), then undefines them for the next module.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
MAX_README_LINES = 250
OWN_DOCS = [README, REPO_ROOT / "ARCHITECTURE.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
COMMAND_DOCS = [*OWN_DOCS, REPO_ROOT / "BUILD.md"]
PACKAGES = ("tfrecords", "trainer", "launch", "benchmarks")
TRAINER = "trainer.train"  # where a launcher's flags after `--` go
ALWAYS_ACCEPTED = {"flagfile", "undefok", "help", "helpshort", "helpfull", "helpxml"}  # absl's own
COMMAND_ENDS = {";", "&&", "||", "|", "&"}
# Flags of other programs the docs name in running text: mkdocs build --strict, gcloud ... --config, --worker=all.
OTHER_TOOLS_FLAGS = {"strict", "config", "worker"}
PYTHON = re.compile(r"(?:[\w.~/-]*/)?python3?")  # python, python3, .venv/bin/python

LIST_FLAGS = r"""
import json, runpy, sys
from absl import app, flags

class Stop(Exception):
    pass

def stop(*args, **kwargs):
    raise Stop

app.run = stop  # a module's flags are all defined once it would run; its main never runs
FLAGS = flags.FLAGS
result = {}
for module in sys.argv[1:]:
    before = set(FLAGS)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        result[module] = {"error": "never calls absl.app.run: not an entry point"}
    except Stop:
        result[module] = {"flags": {name: FLAGS[name].boolean for name in FLAGS}}
    except BaseException as error:
        missing = getattr(error, "name", None) if isinstance(error, ImportError) else None
        result[module] = {"error": f"{type(error).__name__}: {error}", "missing_package": missing}
    for name in set(FLAGS) - before:  # the next program defines its own flags of the same names
        delattr(FLAGS, name)
    if module == "tfrecords.beam_build" and "flags" in result[module]:
        # Arguments absl does not know go to Beam's PipelineOptions (--runner, --project, ...).
        from apache_beam.options import pipeline_options
        beam = pipeline_options.PipelineOptions([]).get_all_options()
        result[module]["flags"].update({name: False for name in beam if name not in result[module]["flags"]})
print(json.dumps(result))
"""


def _console_scripts() -> dict:
    """Console script name -> entry module, from setup.py's entry_points."""
    setup = (REPO_ROOT / "setup.py").read_text()
    return dict(re.findall(r'"([\w-]+)=([\w.]+):\w+"', setup))


def _strip_comment(line: str) -> str:
    """The line without its shell comment: a `#` that starts a word, outside quotes."""
    quote = None
    for position, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (position == 0 or line[position - 1].isspace()):
            return line[:position]
    return line


def _tokens(text: str) -> list:
    """Shell words and control operators of one logical line (as a shell splits them, or on spaces)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in program output shown in a block
        return text.split()


def _code(path) -> tuple:
    """(fenced blocks' logical lines, inline code spans) of a markdown file, with their line numbers."""
    lines, spans, fence, continued = [], [], None, ""
    prose = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        marker = re.match(r"\s*(`{3,}|~{3,})", line)
        if fence is None and marker:
            fence = marker.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
                fence = None
                continue
            line = _strip_comment(line)
            if line.rstrip().endswith("\\"):
                continued += line.rstrip()[:-1] + " "
                continue
            lines.append((number, continued + line))
            continued = ""
        else:
            prose.append((number, line))
    for number, line in prose:
        spans.extend((number, span) for span in re.findall(r"`([^`\n]+)`", line))
    return lines, spans


def _module_of(tokens: list, position: int) -> tuple:
    """(entry module, index of its first argument) if a command of the project starts at tokens[position]."""
    token = tokens[position]
    following = tokens[position + 1:position + 3]
    if PYTHON.fullmatch(token):
        if len(following) == 2 and following[0] == "-m" and following[1].split(".")[0] in PACKAGES:
            return following[1], position + 3
        if following and following[0].endswith(".py") and following[0].split("/")[0] in PACKAGES:
            return following[0][:-3].replace("/", "."), position + 2
    return None, None


def _commands(text: str) -> list:
    """[(kind, name, flags)] of the project's commands in one logical line: kind 'module' or 'make'.

    `python ...` counts anywhere (program output shows commands mid-line), a console script or `make` only where
    a shell command starts. A launcher's flags after `--` are returned as a command of the trainer.
    """
    scripts = _console_scripts()
    tokens = _tokens(text)
    found = []
    position = 0
    segment_start = True
    while position < len(tokens):
        token = tokens[position]
        if token in COMMAND_ENDS:
            segment_start = True
            position += 1
            continue
        module, first = _module_of(tokens, position)
        if module is None and segment_start and token in scripts:
            module, first = scripts[token], position + 1
        if module is None and segment_start and token == "make":
            end = next((index for index in range(position + 1, len(tokens)) if tokens[index] in COMMAND_ENDS),
                       len(tokens))
            targets = [word for word in tokens[position + 1:end] if not word.startswith("-") and "=" not in word]
            found.append(("make", None, targets))
            position = end
            continue
        if module is None:
            segment_start = False
            position += 1
            continue
        end = next((index for index in range(first, len(tokens)) if tokens[index] in COMMAND_ENDS), len(tokens))
        arguments = tokens[first:end]
        passed = arguments[:arguments.index("--")] if "--" in arguments else arguments
        found.append(("module", module, [word for word in passed if word.startswith("--") and word != "--"]))
        if "--" in arguments and module.startswith("launch."):
            rest = arguments[arguments.index("--") + 1:]
            found.append(("module", TRAINER, [word for word in rest if word.startswith("--")]))
        position = end
    return found


def _doc_commands() -> list:
    """[(where, kind, name, flags)] of every project command in the docs' code."""
    commands = []
    for path in COMMAND_DOCS:
        lines, spans = _code(path)
        for number, line in lines:
            for kind, name, words in _commands(line):
                commands.append((f"{path.name}:{number}", kind, name, words))
        for number, span in spans:
            for kind, name, words in _commands(span):
                commands.append((f"{path.name}:{number}", kind, name, words))
    return commands


@pytest.fixture(scope="module")
def entry_point_flags() -> dict:
    """Entry module -> {"flags": {name: is_boolean}} (or {"error": ...}), for every module the docs call."""
    modules = sorted({name for _, kind, name, _ in _doc_commands() if kind == "module"} | {TRAINER})
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-c", LIST_FLAGS, *modules], cwd=REPO_ROOT, env=environment,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _unknown_flag(word: str, flags: dict) -> bool:
    name = word[2:].split("=", 1)[0]
    if name in flags or name in ALWAYS_ACCEPTED:
        return False
    return not (name.startswith("no") and flags.get(name[2:]) is True)


def _flag_tables(path) -> list:
    """[(where, entry module or None, flags)] of the tables whose first column is `flag`.

    The entry module is the one the table's heading names (`## Trainer flags (`python -m trainer.train`)`).
    """
    tables, heading, fence, header = [], "", None, False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        marker = re.match(r"\s*(`{3,}|~{3,})", line)
        if marker:
            fence = None if fence == marker.group(1) else (fence or marker.group(1))
            continue
        if fence is not None:
            continue
        if line.startswith("#"):
            heading = line
        cells = line.split("|")
        if not line.startswith("|") or len(cells) < 3:
            header = False
            continue
        if cells[1].strip().lower() == "flag":
            header = True
            module = re.search(r"python -m ([\w.]+)", heading)
            tables.append((f"{path.name}:{number}", module.group(1) if module else None, []))
        elif header:
            tables[-1][2].extend(re.findall(r"`(--[a-z][\w]*)", cells[1]))
    return tables


def test_the_docs_show_commands_of_every_kind():
    commands = _doc_commands()
    modules = {name for _, kind, name, _ in commands if kind == "module"}
    assert {"tfrecords.build", "trainer.train", "trainer.predict", "launch.vertex", "benchmarks.accuracy"} <= modules
    assert sum(len(words) for _, kind, _, words in commands if kind == "module") > 100
    assert {"demo", "test"} <= {target for _, kind, _, targets in commands if kind == "make" for target in targets}


def test_every_flag_a_documented_command_passes_exists_in_its_entry_point(entry_point_flags):
    problems, unavailable = [], {}
    for where, kind, module, words in _doc_commands():
        if kind != "module":
            continue
        known = entry_point_flags[module]
        if "error" in known:
            if known.get("missing_package") and known["missing_package"].split(".")[0] not in PACKAGES:
                unavailable[module] = known["error"]  # an optional extra that is not installed
            else:
                problems.append(f"{where}: python -m {module}: {known['error']}")
            continue
        problems += [f"{where}: python -m {module} has no flag {word.split('=', 1)[0]}"
                     for word in words if _unknown_flag(word, known["flags"])]
    assert not problems, "the docs show commands that would fail:\n" + "\n".join(problems)
    if unavailable:
        pytest.skip(f"not checked, their packages are not installed: {unavailable}")


def test_every_flag_a_flags_table_lists_exists_in_its_entry_point(entry_point_flags):
    tables = [table for path in OWN_DOCS for table in _flag_tables(path)]
    checked = {module for _, module, _ in tables if module}
    assert {"tfrecords.build", "trainer.train"} <= checked, f"the flags tables are no longer found: {tables}"
    problems = []
    for where, module, named in tables:
        if module is None:
            continue  # checked against every entry point by the next test
        known = entry_point_flags.get(module, {}).get("flags")
        assert known is not None, f"{where}: the table's entry point {module} did not load: {entry_point_flags.get(module)}"
        problems += [f"{where}: {module} has no flag {word}" for word in named if _unknown_flag(word, known)]
    assert not problems, "the flags tables list flags their entry points do not have:\n" + "\n".join(problems)


def test_every_flag_the_prose_names_is_a_flag_of_the_project(entry_point_flags):
    """A `--flag` in running text belongs to one of the entry points (or is another tool's, named here)."""
    every_flag = {}
    for known in entry_point_flags.values():
        for name, boolean in known.get("flags", {}).items():
            every_flag[name] = every_flag.get(name, False) or boolean
    problems = []
    for path in OWN_DOCS:
        for number, span in _code(path)[1]:
            for name in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_]*)(?![\w<*])", span):
                if name[2:] not in OTHER_TOOLS_FLAGS and _unknown_flag(name, every_flag):
                    problems.append(f"{path.name}:{number}: {name}")
    assert not problems, "the docs name flags no entry point has:\n" + "\n".join(problems)


def test_every_make_target_the_docs_show_exists():
    makefile = (REPO_ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+)\s*:", makefile, flags=re.MULTILINE))
    missing = [f"{where}: make {target}" for where, kind, _, named in _doc_commands() if kind == "make"
               for target in named if target not in targets]
    assert not missing, f"the docs show make targets the Makefile does not have: {missing}"


def test_every_repository_path_and_module_the_docs_name_exists():
    missing = []
    for path in OWN_DOCS:
        text = path.read_text()
        for named in sorted(set(re.findall(rf"\b((?:{'|'.join(PACKAGES)}|tests)/[\w/]+\.py)\b", text))):
            if not (REPO_ROOT / named).is_file():
                missing.append(f"{path.name}: {named}")
        for named in sorted(set(re.findall(rf"`((?:tfrecords|trainer)\.[\w.]+)", text))):
            parts = named.split(".")
            if not any((REPO_ROOT.joinpath(*parts[:size]).with_suffix(".py")).is_file()
                       for size in range(2, len(parts) + 1)):
                missing.append(f"{path.name}: {named}")
    assert not missing, f"the docs name files or modules that do not exist: {missing}"


def _github_anchor(heading: str) -> str:
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda match: match.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_the_readme_is_a_front_door_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, "README.md is the front door; the manual goes into docs/"
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (REPO_ROOT / file_part) if file_part else README
        if not linked.is_file():
            broken.append(target)
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
            if anchor not in {_github_anchor(heading) for heading in headings}:
                broken.append(target)
    assert not broken, f"README.md links to files or anchors that do not exist: {broken}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason='mkdocs and mkdocs-material are not installed (pip install -e ".[docs]")')
def test_the_site_builds_strictly(tmp_path):
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
