"""The package as users install it (issue 49): ``pip install .`` (not only ``-e``) into a
fresh virtual environment gives ``small_photo_classifier`` and the
``small-photo-classifier`` command with the scripts' flags, from any folder."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_copy(target: str) -> str:
    """What a source distribution holds: the package and its build files (no run
    folders, caches or build leftovers of the checkout)."""
    os.makedirs(target)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), target)
    shutil.copytree(os.path.join(ROOT, "small_photo_classifier"),
                    os.path.join(target, "small_photo_classifier"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.mark.slow
def test_pip_install_gives_the_package_and_its_command_anywhere(tmp_path):
    source = _source_copy(str(tmp_path / "source"))
    venv = tmp_path / "venv"
    # The dependencies (TensorFlow...) come from this interpreter's site-packages: the
    # test installs only the package, offline.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=300)
    python, command = str(venv / "bin" / "python"), str(venv / "bin" / "small-photo-classifier")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--no-build-isolation", source], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args):
        return subprocess.run(list(args), capture_output=True, text=True, cwd=elsewhere,
                              env=env, timeout=300)

    where = run(python, "-c", "import os, small_photo_classifier as p; "
                "from small_photo_classifier.workflow.use import serving; "
                "print(os.path.dirname(p.__file__)); "
                "print(sorted(os.listdir(serving.PAGES)))")
    assert where.returncode == 0, where.stderr[-3000:]
    package_dir, pages = where.stdout.splitlines()
    assert package_dir.startswith(str(venv)), package_dir  # the installed copy, not the checkout
    assert "label.html" in pages and "predict.js" in pages  # serve.py's pages came along
    top = run(command, "--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("train", "predict", "export",
                                                                 "serve"))
    for name, flag in (("train", "--data_dir"), ("predict", "--output"),
                       ("export", "--export"), ("serve", "--port")):
        shown = run(command, name, "--help")
        assert shown.returncode == 0 and flag in shown.stdout, (name, shown.stderr[-2000:])
    # The same one-paragraph errors as the checkout's scripts, before TensorFlow starts.
    wrong = run(command, "predict", f"--workdir={tmp_path / 'no_such_run'}",
                f"--data_dir={elsewhere}", f"--output={elsewhere / 'out.csv'}")
    assert wrong.returncode != 0 and "no_such_run" in wrong.stderr + wrong.stdout
    assert "Traceback" not in wrong.stderr
    unknown = run(command, "fly")
    assert unknown.returncode == 2 and "unknown command 'fly'" in unknown.stderr


def test_the_command_dispatches_to_each_script(monkeypatch, capsys):
    """``small-photo-classifier <command>`` runs that script's ``run()`` with the rest of
    the arguments as its flags."""
    from small_photo_classifier import cli
    called = {}

    class Script:
        @staticmethod
        def run():
            called["argv"] = list(sys.argv)

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: called.update(
        module=name) or Script)
    monkeypatch.setattr(sys, "argv", ["small-photo-classifier"])
    cli.main(["small-photo-classifier", "predict", "--workdir=r", "--output=o.csv"])
    assert called == {"module": "small_photo_classifier.scripts.predict",
                      "argv": ["small-photo-classifier predict", "--workdir=r", "--output=o.csv"]}
    with pytest.raises(SystemExit) as stop:
        cli.main(["small-photo-classifier"])
    assert stop.value.code == 2 and "commands:" in capsys.readouterr().out
