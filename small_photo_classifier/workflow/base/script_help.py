"""An entry point's ``-h``: the script's docstring and its flags grouped by stage, in
the order a run uses them (absl's own --help would list none of the grouped flags)."""

import sys

from absl import app

from small_photo_classifier.workflow.base.flags import (DATA, DEPLOY, DEVICES, FINETUNE, HEADS,
                                                        LABELLING, MODEL, OUTPUTS, PREDICT, SWEEP,
                                                        WHOLE)


def run_script(main, fv, doc: str) -> None:
    """An entry point's ``__main__``: ``-h``/``--help`` print the grouped help (before absl,
    whose own --help would list none of our grouped flags), else ``app.run(main)``."""
    if help_requested(sys.argv):
        print(grouped_help(fv, doc))
        sys.exit(0)
    app.run(main)


def help_requested(argv) -> bool:
    """``-h``, ``--help`` or ``--helpshort`` (``--helpfull`` stays absl's: every flag,
    absl's own and the testing ones too)."""
    return any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:])


def grouped_help(fv, doc: str) -> str:
    """The script's docstring and its flags, group by group in the order a run uses them;
    the testing flags are left to --helpfull."""
    order = (DATA, OUTPUTS, MODEL, HEADS, SWEEP, FINETUNE, WHOLE, PREDICT, LABELLING, DEPLOY,
             DEVICES)
    parts = [doc.rstrip(), ""]
    for group in order:
        text = fv.module_help(group)
        if text.strip():
            parts.append(text.rstrip())
            parts.append("")
    parts.append("Aliases, testing flags and absl's own flags: --helpfull.")
    return "\n".join(parts)
