"""The layout is the architecture (ARCHITECTURE.md): commands on top, stage wings below, arrows one way.

Read from the source, not run: every module's imports of this project, each function's size.
"""

import ast

import pytest

from tests.conftest import REPO_ROOT

# Low -> high: a module may import its own wing or a lower one, never a higher one.
LAYERS = {
    "tfrecords": ["schema", "cli", "writing", "sources", "run", "beam", "entry"],
    "trainer": ["input", "models", "fit", "exports", "reports", "run", "entry"],
}
# The contracts every layer may read: the record format, how file names are read, and the flag parser of every
# entry point.
CONTRACTS = {"tfrecords.schema": 0, "tfrecords.names": 0, "tfrecords.cli": 1}
# What the trainer may read of the converter: the contracts, and its decode (training and serving see the same pixels).
TRAINER_READS = {"tfrecords.schema", "tfrecords.names", "tfrecords.cli", "tfrecords.writing.images"}
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 12


def _modules() -> dict:
    """Dotted module name -> path, for every module of tfrecords/ and trainer/."""
    modules = {}
    for package in LAYERS:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            if parts[-1] != "__init__":  # the packages' __init__ files are empty
                modules[".".join(parts)] = path
    return modules


def _is_entry_point(path) -> bool:
    return "app.run(" in path.read_text()


def _layer(module: str, path) -> tuple:
    """(package, layer index) of a module: its wing, or the contracts and entry points on a package's top."""
    package, *rest = module.split(".")
    if module in CONTRACTS:
        return package, CONTRACTS[module]
    if len(rest) == 1 and _is_entry_point(path):
        return package, LAYERS[package].index("entry")
    if len(rest) >= 2:
        return package, LAYERS[package].index(rest[0])
    return package, None  # a top-level module that is neither: test_every_top_module_is_a_command_or_a_contract


def _imports(path, modules: dict) -> set:
    """The project modules a file imports (from pkg.wing import module, import pkg.wing.module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LAYERS:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] in LAYERS)
    return {name for name in found if name in modules}


def test_every_top_module_is_a_command_or_a_contract():
    for module, path in _modules().items():
        if module.count(".") == 1:
            assert _layer(module, path)[1] is not None, (
                f"{path.relative_to(REPO_ROOT)} is a library module on its package's top, where only commands "
                "(modules that call app.run) and the contracts live: move it into the wing of its stage"
            )


def test_arrows_between_wings_run_one_way():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        package, layer = _layer(module, path)
        for imported in _imports(path, modules):
            imported_package, imported_layer = _layer(imported, modules[imported])
            if imported_package != package:
                # The converter never reads the trainer; the trainer reads only the converter's contracts and decode.
                if package == "tfrecords" or imported not in TRAINER_READS:
                    upward.append(f"{module} -> {imported}")
                continue
            if imported_layer > layer or imported_layer == LAYERS[package].index("entry"):
                upward.append(f"{module} -> {imported}")
    assert not upward, f"imports against the arrows (ARCHITECTURE.md): {upward}"


def test_no_import_cycle():
    modules = _modules()
    graph = {module: _imports(path, modules) for module, path in modules.items()}
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        if state.get(module) == "open":
            cycle = trail[trail.index(module):] + [module]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        state[module] = "open"
        for imported in sorted(graph[module]):
            visit(imported, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_launchers_never_import_the_trainer_or_the_converter():
    for path in sorted((REPO_ROOT / "launch").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            assert not [name for name in names if name.split(".")[0] in LAYERS], path.name


def test_no_function_over_80_lines_or_12_parameters():
    too_big = []
    for folder in ("tfrecords", "trainer", "launch", "benchmarks"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    arguments = node.args
                    parameters = len(arguments.posonlyargs + arguments.args + arguments.kwonlyargs)
                    parameters += bool(arguments.vararg) + bool(arguments.kwarg)
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES or parameters > MAX_PARAMETERS:
                        too_big.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} "
                                       f"({lines} lines, {parameters} parameters)")
    assert not too_big, f"split these (at most {MAX_FUNCTION_LINES} lines, {MAX_PARAMETERS} parameters): {too_big}"
