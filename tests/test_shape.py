"""The code's shape (issues 28 and 42): nothing generic installed, short modules,
functions and parameter lists, workflow's layers importing one way, and no backbone named
outside its description. Static checks: they read the sources, they run nothing of the
tool."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "small_photo_classifier"
SRC = os.path.join(ROOT, PACKAGE)
LIBRARY = tuple(os.path.join(PACKAGE, name) for name in ("pipeline", "features", "workflow",
                                                         "scripts"))
SCRIPTS = ("train.py", "predict.py", "export.py", "serve.py")
# workflow's layers, lowest first: a module may import its own layer and those below.
LAYERS = ("base", "views", "use", "train")


def _sources(tops=LIBRARY + ("bench",)):
    for top in tops:
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            for name in sorted(names):
                if name.endswith(".py"):
                    yield os.path.join(folder, name)
    for name in SCRIPTS:
        yield os.path.join(ROOT, name)


def _functions():
    for path in _sources():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield os.path.relpath(path, ROOT), node


def test_one_package_of_its_own_name_and_nothing_generic_is_importable(tmp_path):
    # The install (pip install -e .) puts the package on the path under its own name; a
    # module called `features` or `train` would shadow other projects' modules of that name.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    generic = ("pipeline", "features", "workflow", "scripts") + tuple(s[:-3] for s in SCRIPTS)
    code = ("import importlib.util, sys\n"
            f"found = [n for n in {generic!r} if importlib.util.find_spec(n) is not None]\n"
            "print(','.join(found))\n"
            f"import {PACKAGE}.workflow.base.flags, {PACKAGE}.features.trust\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importable from outside the checkout: {out.stdout}"


def test_no_module_over_450_lines():
    long = {}
    for path in _sources():
        with open(path) as f:
            lines = len(f.read().splitlines())
        if lines > 450:
            long[os.path.relpath(path, ROOT)] = lines
    assert not long


def test_no_function_over_60_lines():
    long = {f"{path}:{node.name}": node.end_lineno - node.lineno + 1
            for path, node in _functions() if node.end_lineno - node.lineno + 1 > 60}
    assert not long


def test_no_function_takes_more_than_8_parameters():
    # Settings objects (features.fit.settings, cache.Extraction, heads.FeatureSplit) carry
    # what used to be threaded through every level as keyword arguments.
    def count(node):
        a = node.args
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
        return len([n for n in names if n not in ("self", "cls")]) + bool(a.vararg) + bool(
            a.kwarg)
    many = {f"{path}:{node.name}": count(node) for path, node in _functions()
            if count(node) > 8}
    assert not many


def _within(module: str) -> str:
    """A module's name inside the package (``small_photo_classifier.workflow.base`` ->
    ``workflow.base``)."""
    return module[len(PACKAGE) + 1:] if module.startswith(PACKAGE + ".") else module


def imports(root: str, package: str = "workflow") -> dict:
    """Module -> the modules of ``package`` it imports, function-local imports included
    (where cycles hide), for every module under ``root/package``."""
    out = {}
    for folder, _, names in os.walk(os.path.join(root, package)):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            module = module[:-len(".__init__")] if module.endswith(".__init__") else module
            found = set()
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    name = _within(node.module)
                    if name == PACKAGE:  # from small_photo_classifier import pipeline
                        found |= {a.name for a in node.names if a.name == package}
                    elif name.split(".")[0] == package:
                        found |= {f"{name}.{a.name}" for a in node.names}
                        found.add(name)
                elif isinstance(node, ast.Import):
                    found |= {_within(a.name) for a in node.names
                              if _within(a.name).split(".")[0] == package}
            out[module] = found
    known = set(out)
    return {m: {i for i in found if i in known and i != m and not m.startswith(i + ".")}
            for m, found in out.items()}


def problems(graph: dict) -> list:
    """Imports against the layers' direction, and import cycles, in ``graph``."""
    def layer(module):
        parts = module.split(".")
        return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None
    found = [f"{m} imports {i} (a higher layer)" for m, targets in sorted(graph.items())
             for i in sorted(targets)
             if layer(m) is not None and layer(i) is not None and layer(i) > layer(m)]
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for i in sorted(graph.get(m, ())):
            if state.get(i) == "open":
                found.append("cycle: " + " -> ".join(stack[stack.index(i):] + [i]))
            elif i not in state:
                visit(i)
        stack.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_workflow_layers_import_one_way_and_nothing_imports_in_a_cycle():
    graph = imports(SRC)
    assert set(graph) >= {f"workflow.{layer}" for layer in LAYERS}
    assert problems(graph) == []
    for package in ("features", "pipeline"):  # the layers below workflow
        assert problems(imports(SRC, package)) == []
    below = [path for path in _sources(LIBRARY[:2]) if _imported_modules(path) & {"workflow"}]
    assert below == [], "pipeline or features imports workflow (a higher layer)"


def _imported_modules(path: str) -> set:
    """The package's top-level subpackages a source file imports (function-local too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level \
            else [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            inner = _within(name)
            if inner == PACKAGE and isinstance(node, ast.ImportFrom):
                found |= {a.name for a in node.names}
            elif inner != name:
                found.add(inner.split(".")[0])
    return found


def test_the_import_check_finds_a_planted_back_edge_and_cycle(tmp_path):
    for layer in LAYERS:
        (tmp_path / "workflow" / layer).mkdir(parents=True)
        (tmp_path / "workflow" / layer / "__init__.py").write_text("")
    (tmp_path / "workflow" / "__init__.py").write_text("")
    (tmp_path / "workflow" / "base" / "config.py").write_text(
        "def check():\n    from workflow.use import deploy  # function-local: still found\n")
    (tmp_path / "workflow" / "use" / "deploy.py").write_text(
        "from workflow.base import config\n")
    found = problems(imports(str(tmp_path)))
    assert "workflow.base.config imports workflow.use.deploy (a higher layer)" in found
    assert any(f.startswith("cycle: ") and "workflow.use.deploy" in f for f in found)


def test_no_code_outside_the_backbone_registry_names_vgg16():
    """Every per-backbone property comes from the backbone's description
    (`features.networks`); a branch on the name "vgg16", or a parameter whose default is
    VGG16, would give VGG16's answer to a caller that did not ask for it."""
    allowed = {os.path.join(PACKAGE, "features", "networks.py"),
               os.path.join(PACKAGE, "workflow", "base", "flags.py")}
    found = []
    for path in _sources(LIBRARY):
        rel = os.path.relpath(path, ROOT)
        if rel in allowed:
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value == "vgg16"
                    for c in [node.left, *node.comparators]):
                found.append(f"{rel}:{node.lineno} compares with 'vgg16'")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for default in node.args.defaults + [d for d in node.args.kw_defaults if d]:
                    text = ast.unparse(default)
                    if "VGG16" in text or text in ("'vgg16'", '"vgg16"'):
                        found.append(f"{rel}:{node.lineno} {node.name}() defaults to {text}")
            if isinstance(node, ast.ClassDef):  # dataclass fields' defaults
                for field in node.body:
                    text = ast.unparse(field.value) if isinstance(field, ast.AnnAssign) \
                        and field.value is not None else ""
                    if "VGG16" in text or text in ("'vgg16'", '"vgg16"') or \
                            text == "networks.BackboneChoice()":
                        found.append(f"{rel}:{field.lineno} {node.name} defaults to {text}")
    assert found == []


def _readme_run_folder_names() -> set:
    """The top-level names of the run-folder table in the README's *Outputs* section
    (``heads/<S>/roc.png`` is ``heads/``)."""
    import re
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("In `--workdir`"):text.index("How big: the demo")]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            for name in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
                names.add(name.split("/")[0] + "/" if "/" in name else name)
    return names


def test_the_readme_table_of_run_folder_files_is_the_registry():
    """What the console lists after a run (`workflow.base.run_files`) and the README's
    table name the same files: a file added to one and not the other fails here."""
    from small_photo_classifier.workflow.base import run_files
    assert _readme_run_folder_names() == {name for name, _ in run_files.FILES}
    # Every name has a role, and names of every kind resolve.
    assert run_files.role("model_fp16.tflite") == "--export=tflite --quantize=fp16"
    # A scenario's epochs are in heads/<S>/ (the top level is the exported model's).
    assert not [n for n, _ in run_files.FILES if n.startswith("history_heads")]
    assert run_files.role("test_predictions_report.html") and run_files.role("heads")
    assert run_files.role("notes.txt") is None
