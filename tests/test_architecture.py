"""The house: bnseq's parts as subpackages, imports flowing one way, modules of a readable size.

docs/architecture.md draws the map; this test holds the code to it. Every
`import` of a bnseq module anywhere in a module (inside functions too) counts.
"""

import ast
import os

import pytest

import bnseq

PACKAGE = os.path.dirname(os.path.abspath(bnseq.__file__))

# The floors, lowest first: a module may import its own floor and the floors below, never one above.
# Within a floor, modules may import each other as long as no circle forms (checked below).
FLOORS = [
    {"bnseq.internals", "bnseq.notices", "bnseq.kinds"},  # import nothing of bnseq
    {"bnseq.probes"},
    {"bnseq.reading"},
    {"bnseq.deciding"},
    {"bnseq.statistics"},
    {"bnseq.changing"},
    {"bnseq.exporting"},
    {"bnseq.callbacks", "bnseq.cli", "bnseq.demo", "bnseq.__main__", "bnseq"},
]
LONGEST = 500  # lines
TOP_LEVEL = 9  # modules directly in bnseq/


def _modules():
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path):
    """The bnseq modules `path` imports, as module names."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "bnseq")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bnseq":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return found


def _floor(module):
    for index, floor in enumerate(FLOORS):
        if module in floor or any(module.startswith(part + ".") for part in floor if part != "bnseq"):
            return index
    raise AssertionError(f"{module} is on no floor of the map: add it to FLOORS and docs/architecture.md")


def test_every_module_is_on_a_floor_of_the_map():
    for module in MODULES:
        _floor(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_down(module):
    upward = [
        target for target in _imports(MODULES[module])
        if target != "bnseq" and _floor(target) > _floor(module)
    ]
    assert not upward, f"{module} (floor {_floor(module)}) imports a higher floor: {sorted(upward)}"


def test_no_import_circle():
    graph = {module: {target for target in _imports(path) if target in MODULES and target != module}
             for module, path in MODULES.items()}
    # A package's __init__ is imported with each of its modules; the facade imports everything.
    graph = {module: {target for target in targets if target != "bnseq"} for module, targets in graph.items()}
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_longer_than_the_limit(module):
    with open(MODULES[module], encoding="utf-8") as file:
        lines = sum(1 for _ in file)
    assert lines <= LONGEST, f"{module} has {lines} lines; split it where it does two jobs"


def test_the_top_level_holds_at_most_nine_modules():
    top = sorted(name for name in os.listdir(PACKAGE) if name.endswith(".py"))
    assert len(top) <= TOP_LEVEL, top


@pytest.mark.parametrize("part", sorted(m for m in MODULES if m.count(".") == 1 and os.path.basename(
    MODULES[m]) == "__init__.py"))
def test_each_subpackage_says_what_it_does_and_what_it_may_import(part):
    tree = ast.parse(open(MODULES[part], encoding="utf-8").read())
    doc = ast.get_docstring(tree)
    assert doc and "May import" in doc, f"{part}/__init__.py needs a docstring ending in 'May import: ...'"
    assert not [node for node in tree.body if not isinstance(node, ast.Expr)], (
        f"{part}/__init__.py holds only its docstring (importing the part's modules there would "
        "import the whole part with any one of them)"
    )


def test_no_public_function_shares_its_name_with_a_module():
    # `::: bnseq.fold` on the docs site rendered the module bnseq/fold.py instead of the function (0.5.0).
    modules = {name.rsplit(".", 1)[-1] for name in MODULES}
    clashing = [name for name in bnseq.__all__ if name in modules and not name == "callbacks"]
    assert not clashing, clashing


def test_the_map_names_every_subpackage_and_module():
    root = os.path.dirname(PACKAGE)
    with open(os.path.join(root, "docs", "architecture.md"), encoding="utf-8") as file:
        text = file.read()
    missing = []
    for module, path in MODULES.items():
        name = os.path.basename(path)
        if name == "__init__.py" and module != "bnseq":
            name = module.rsplit(".", 1)[-1] + "/"
        if name not in text:
            missing.append(name)
    assert not missing, f"docs/architecture.md does not name {missing}"
