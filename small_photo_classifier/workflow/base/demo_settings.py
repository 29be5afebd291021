"""What ``--demo`` changes from the defaults, and why (printed at the start of a demo run;
TensorFlow-free, as the flags are checked before it starts)."""

SETTINGS = {"weights": "none", "include_top": False, "image_size": 64, "val_size": "40",
            "cv_folds": "3", "scenarios": ["A", "B"], "finetune_epochs": 3, "monitor": "loss",
            "heads_patience": 3}
REASONS = {
    "weights": "offline and instant; random weights prove the plumbing, not transfer quality",
    "include_top": "VGG16 only: no 120M-parameter ImageNet top without ImageNet weights",
    "image_size": "64 px keeps the demo fast on 2 CPU cores",
    "val_size": "160 synthetic images: 40 for validation",
    "cv_folds": "3 folds of 120 training images are enough to show CV",
    "scenarios": "scenario C (the backbone's last stage, from its cached input) is the slow "
                 "one on CPU",
    "finetune_epochs": "a few epochs show the fine-tuning stage when a scenario beats the "
                       "linear probe (on random features the probe usually wins and is "
                       "exported: then no epoch runs, and the summary says so)",
    "monitor": "when fine-tuning runs: with 40 synthetic validation images the AUC saturates "
               "near 1.0 every epoch; the loss still tells epochs apart",
    "heads_patience": "synthetic curves settle in a few epochs; a scenario stops 3 epochs "
                      "after its last gain instead of 10",
}


def describe(flag_values) -> str:
    """The settings --demo changed from the defaults (flags not passed), one line each."""
    lines = []
    for name, value in SETTINGS.items():
        flag = flag_values[name]
        if flag.present or value == flag.default:
            continue
        shown = ",".join(value) if isinstance(value, list) else value
        default = ",".join(flag.default) if isinstance(flag.default, list) else flag.default
        if isinstance(value, bool):
            lines.append(f"  --{'' if value else 'no'}{name} (default --"
                         f"{'' if default else 'no'}{name}): {REASONS[name]}")
        else:
            lines.append(f"  --{name}={shown} (default {default}): {REASONS[name]}")
    if not lines:
        return ""
    return ("Demo on SYNTHETIC data: these settings differ from the defaults so that it "
            "finishes in about a minute (pass any flag to override it; your own data gets "
            "the defaults):\n" + "\n".join(lines))
