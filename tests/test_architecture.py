"""The house: bnseq's parts as subpackages, imports flowing one way, modules of a readable size.

docs/architecture.md draws the map; this test holds the code to it. Every
`import` of a bnseq module anywhere in a module (inside functions too) counts.
"""

import ast
import os
import re

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


# Where each module is tested: a test module of its own, or the test module of the public function
# it is the inside of, with the evidence that the test module reaches it (a regular expression that
# must occur in that file: the module imported, or the public entry point called). A new module
# fails `test_every_module_has_its_tests` until it is given its tests here.
TESTED_BY = {
    "bnseq.__main__": ("test_cli.py", r'"-m", "bnseq"'),
    "bnseq.callbacks": ("test_callbacks.py", r"bnseq\.callbacks\.Recalibrate"),
    "bnseq.changing.convert": ("test_convert.py", r"bnseq\.batch_normalize\("),
    "bnseq.changing.folding": ("test_fold.py", r"bnseq\.fold\("),
    "bnseq.changing.freezing": ("test_freeze.py", r"bnseq\.freeze\("),
    "bnseq.changing.layers": ("test_layers.py", r"bnseq\.BatchNormalization\("),
    "bnseq.changing.marks": ("test_sequential.py", r"bnseq\.with_batch_norm\("),
    "bnseq.changing.naming": ("test_rewrite.py", r"from bnseq\.changing import naming"),
    "bnseq.changing.quantized_layers": ("test_quantize_aware.py", r"from bnseq\.changing import quantized_layers"),
    "bnseq.changing.quantizing": ("test_quantize_aware.py", r"bnseq\.quantize_aware\("),
    "bnseq.changing.reparameterizing": ("test_reparameterize.py", r"bnseq\.reparameterize\("),
    "bnseq.changing.rewrite": ("test_rewrite.py", r"from bnseq\.changing import rewrite"),
    "bnseq.changing.sequential": ("test_sequential.py", r"bnseq\.Sequential\("),
    "bnseq.changing.units": ("test_sequential.py", r"\.add\("),
    "bnseq.cli": ("test_cli.py", r"from bnseq import cli"),
    "bnseq.deciding.branches": ("test_reparameterize.py", r"bnseq\.reparameterize_report\("),
    "bnseq.deciding.findings": ("test_lint.py", r"bnseq\.lint\("),
    "bnseq.deciding.fine_tuning": ("test_fine_tuning.py", r"BN005"),
    "bnseq.deciding.fold_math": ("test_fold.py", r"from bnseq\.deciding\.fold_math import"),
    "bnseq.deciding.fold_plan": ("test_fold.py", r"bnseq\.fold_report\("),
    "bnseq.deciding.fold_through": ("test_fold_through.py", r"from bnseq\.deciding import fold_through"),
    "bnseq.deciding.guards": ("test_never_wrong.py", r"from bnseq\.deciding import guards"),
    "bnseq.deciding.overview": ("test_fine_tuning.py", r"bnseq\.summary\("),
    "bnseq.deciding.quantize_plan": ("test_quantize_aware.py", r"bnseq\.quantize_aware_with_report\("),
    "bnseq.deciding.rules": ("test_rules.py", r"from bnseq\.deciding import rules"),
    "bnseq.demo": ("test_cli.py", r'cli\.main\(\["demo"'),
    "bnseq.exporting.checking": ("test_export.py", r"from bnseq\.exporting import checking"),
    "bnseq.exporting.exporter": ("test_export.py", r"bnseq\.export\("),
    "bnseq.exporting.quantization": ("test_export.py", r'quantize="int8"'),
    "bnseq.exporting.runtimes": ("test_runtimes.py", r"from bnseq\.exporting import runtimes"),
    "bnseq.internals": ("test_internals.py", r"from bnseq import internals"),
    "bnseq.kinds": ("test_kinds.py", r"from bnseq import kinds"),
    "bnseq.notices": ("test_hostile.py", r"BatchNormPlacementWarning"),
    "bnseq.probes": ("test_probes.py", r"from bnseq import probes"),
    "bnseq.reading.files": ("test_files.py", r"from bnseq\.reading import files"),
    "bnseq.reading.graph": ("test_graph.py", r"from bnseq\.reading import graph"),
    "bnseq.reading.holding": ("test_freeze.py", r"bnseq\.summary\("),
    "bnseq.reading.layout": ("test_layout.py", r"from bnseq\.reading import layout"),
    "bnseq.reading.partial": ("test_real_models.py", r"read through"),
    "bnseq.reading.trace": ("test_trace.py", r"from bnseq\.reading import trace"),
    "bnseq.statistics.collective": ("test_collective.py", r"from bnseq\.statistics import collective"),
    "bnseq.statistics.compiled": ("test_collective.py", r"from bnseq\.statistics import compiled"),
    "bnseq.statistics.data": ("test_data.py", r"from bnseq\.statistics import data"),
    "bnseq.statistics.plans": ("test_segments.py", r"from bnseq\.statistics import plans"),
    "bnseq.statistics.recalibration": ("test_recalibrate.py", r"bnseq\.recalibrate\("),
    "bnseq.statistics.segments": ("test_segments.py", r"from bnseq\.statistics import segments"),
}


def test_every_module_has_its_tests():
    modules = sorted(module for module, path in MODULES.items() if os.path.basename(path) != "__init__.py")
    assert sorted(TESTED_BY) == modules, "give each new module its tests and its line in TESTED_BY"
    folder = os.path.dirname(os.path.abspath(__file__))
    missing = []
    for module, (test_module, evidence) in TESTED_BY.items():
        path = os.path.join(folder, test_module)
        if not os.path.exists(path) or not re.search(evidence, open(path, encoding="utf-8").read()):
            missing.append(f"{module}: {test_module} does not reach it ({evidence})")
    assert not missing, "\n".join(missing)
