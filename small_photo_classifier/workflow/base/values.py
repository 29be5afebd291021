"""One flag value at a time: parsed and checked before TensorFlow starts, each with an
error that says what was expected and what was given."""

import importlib.util
from typing import List, Optional, Tuple, Union

from small_photo_classifier.pipeline import run_info
from small_photo_classifier.pipeline.errors import ConfigError


def _floats(values, flag: str) -> Tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise ConfigError(f"{flag} must be a comma-separated list of numbers; got "
                          f"{','.join(values)!r}.") from None


def parse_val_size(text: str):
    """``--val_size``: "auto", an integer count ("200") or a fraction ("0.2"), each class
    in its share of the data; or "100+100" (one term per class, all equal): that many
    of each class, the reference write-up's balanced split (`pipeline.split.Balanced`)."""
    from small_photo_classifier.pipeline.split import Balanced
    text = str(text).strip()
    if text.lower() == "auto":
        return "auto"
    if "+" in text:
        terms = [t.strip() for t in text.split("+")]
        if len(terms) >= 2 and all(t.isdigit() and int(t) >= 1 for t in terms) and \
                len(set(map(int, terms))) == 1:
            return Balanced(int(terms[0]), len(terms))
        raise ConfigError(f"--val_size={text!r}: a balanced split names the same count for "
                          "every class, e.g. 100+100 for two classes.")
    try:
        value = float(text)
    except ValueError as err:
        raise ConfigError(f"--val_size must be a count like 200, a fraction like 0.2, "
                          f"100+100 (that many of each class) or 'auto'; got {text!r}.") from err
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise ConfigError(f"--val_size must be a count >= 1 or a fraction in (0, 1); got {text!r}.")


def parse_folds(text: str) -> Union[int, str]:
    """``--cv_folds``: "auto" or an integer (0 for none)."""
    text = str(text).strip().lower()
    if text == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"--cv_folds must be an integer or 'auto'; got {text!r}.") from None
    if k == 1 or k < 0:
        raise ConfigError(f"--cv_folds must be 0 (none) or at least 2; got {k}.")
    return k


# --export's formats, and what each needs beyond TensorFlow, as (module, pip name).
FORMATS = ("savedmodel", "onnx", "tflite")
_NEEDS = {"onnx": [("tf2onnx", "tf2onnx"), ("onnxruntime", "onnxruntime")]}


def parse_formats(text) -> List[str]:
    """``--export`` as a list of formats (empty for none); clear errors for unknown ones
    and for missing converters or runtimes, before any work starts."""
    items = [t.strip().lower() for t in (text if isinstance(text, (list, tuple))
                                         else str(text or "").split(",")) if t.strip()]
    if items in ([], ["none"]):
        return []
    unknown = [t for t in items if t not in FORMATS]
    if unknown:
        raise ConfigError(f"--export: unknown format(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(FORMATS)} (comma-separated), or none.")
    missing = [pip for f in items for module, pip in _NEEDS.get(f, [])
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"--export={','.join(items)} needs {', '.join(missing)}, which is not "
                          "installed: python -m pip install -e \".[export]\"")
    return list(dict.fromkeys(items))


def parse_threshold(text: Optional[str]) -> Optional[str]:
    """``--threshold``: 0.5 (or any number in (0, 1)), auto, precision:P or recall:R."""
    if text in (None, "", "default"):
        return None
    t = str(text).strip().lower()
    try:
        if t == "auto":
            return t
        if ":" in t:
            what, value = t.split(":", 1)
            if what in ("precision", "recall") and 0 < float(value) <= 1:
                return f"{what}:{float(value):g}"
        elif 0 < float(t) < 1:
            return f"{float(t):g}"
    except ValueError:
        pass
    raise ConfigError(f"--threshold={text!r}: expected a probability in (0, 1) such as 0.5, "
                      "auto (best F1), precision:P or recall:R (e.g. precision:0.95).")


def check_rate(rate: float) -> float:
    """``--unfamiliar_rate``: the share of held-out known-class photos flagged, in [0, 0.5]."""
    if not 0.0 <= float(rate) <= 0.5:
        raise ConfigError(f"--unfamiliar_rate={rate}: expected a share between 0 and 0.5 "
                          "(e.g. 0.05 flags about 5 % of photos like the training photos).")
    return float(rate)


def parse_tta(text) -> Union[int, str]:
    """``--tta``: "auto" or a number of views from 1 to 8."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"--tta must be 'auto' or a number of views between 1 and {run_info.MAX_TTA}; "
                          f"got {text!r}.") from None
    run_info.check_tta(n)
    return n
