"""The code's shape (issue 28): nothing generic installed, short modules, functions and
parameter lists. Static checks: they read the sources, they run nothing of the tool."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("pipeline", "features", "workflow")
SCRIPTS = ("train.py", "predict.py", "export.py")


def _sources():
    for top in LIBRARY:
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


def test_nothing_of_ours_is_importable_from_outside_the_checkout(tmp_path):
    # The install (pip install -e .) puts only the dependencies on the path; a module
    # called `features` or `train` would shadow other projects' modules of that name.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    names = LIBRARY + tuple(s[:-3] for s in SCRIPTS)
    code = ("import importlib.util, sys\n"
            f"found = [n for n in {names!r} if importlib.util.find_spec(n) is not None]\n"
            "print(','.join(found))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importable from outside the checkout: {out.stdout}"
    # ... while from the checkout they are (the scripts' folder is on the path).
    inside = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert inside.stdout.strip().split(",") == list(names)


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
