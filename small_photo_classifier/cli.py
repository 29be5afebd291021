"""``small-photo-classifier <command> [--flags]``: the installed command, one subcommand per
script (train, predict, export, serve), with the same absl flags and ``--help`` as
``python train.py`` and the others in a checkout."""

import importlib
import os
import sys

COMMANDS = {
    "train": "train a classifier on a folder of labelled photos (a run folder)",
    "predict": "predict a folder of photos with a run's model (a CSV)",
    "export": "write a run's model as SavedModel, ONNX or TFLite",
    "serve": "serve a run over HTTP: a predict page, a JSON API, a label page",
}


def usage(program: str) -> str:
    """The command's own help: its subcommands, one line each."""
    lines = [f"usage: {program} <command> [--flags]   ({program} <command> --help: its flags)",
             "", "commands:"]
    lines += [f"  {name:8s} {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    """Runs the subcommand named by ``argv[1]`` with the rest of ``argv`` as its flags."""
    argv = list(sys.argv if argv is None else argv)
    program = os.path.basename(argv[0])
    if program in ("", "__main__.py"):
        program = "python -m small_photo_classifier"
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage(program))
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in COMMANDS:
        print(f"{program}: unknown command {name!r}; expected one of "
              f"{', '.join(COMMANDS)}.\n\n{usage(program)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"small_photo_classifier.scripts.{name}")
    # absl reads the flags from sys.argv; the program name names the subcommand.
    sys.argv = [f"{program} {name}", *argv[2:]]
    module.run()


if __name__ == "__main__":
    main()
