"""The manifest a normsurgeon model file carries, read as data: a closed schema, checked before use.

A manifest says where a model came from and what surgery it went through::

    {"format_version": 2,
     "source": "torchvision:resnet50",
     "input_shape": [1, 3, 224, 224],            # the input the model was last run on, or null
     "steps": [{"verb": "convert", "args": {...}}, {"verb": "recalibrate", "args": {"replay": false, ...}}]}

Loading rebuilds the source and replays the *structural* steps (``convert``, ``fold``): each through
a validator of its own arguments (types, allowed values, recipes through the recipe parser). Steps
that changed only tensor values (``recalibrate``, ``equalize``, ``distill``) are kept as history and
never run. Nothing in a manifest can name a path to read or write or a function to call: an unknown
verb, an unknown or ill-typed argument, or a malformed manifest is a :class:`ManifestError`.
Version-1 files (no ``format_version``) go through the same validation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from normsurgeon.errors import ManifestError, NormSurgeonError

FORMAT_VERSION = 2
VALUE_ONLY_VERBS = ("recalibrate", "equalize", "distill")  # history only: never replayed


@dataclass
class Manifest:
    source: str
    steps: list[dict] = field(default_factory=list)
    input_shape: list[int] | None = None

    def structural_steps(self) -> list[tuple[str, dict]]:
        return [(s["verb"], s["args"]) for s in self.steps if s["verb"] not in VALUE_ONLY_VERBS]

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "source": self.source, "input_shape": self.input_shape,
                "steps": self.steps}


# ------------------------------------------------------------------------------- argument checks

def _shape(v: Any) -> str | None:
    if v is None:
        return None
    ok = isinstance(v, list) and len(v) >= 2 and all(isinstance(d, int) and not isinstance(d, bool) and 0 < d
                                                      for d in v)
    return None if ok else "must be a list of at least two positive integers"


def _patterns(v: Any) -> str | None:
    ok = isinstance(v, list) and all(isinstance(p, str) for p in v)
    return None if ok else "must be a list of strings"


def _recipe(v: Any) -> str | None:
    from normsurgeon.recipes import parse_recipe

    if not isinstance(v, str):
        return "must be a recipe string"
    try:
        parse_recipe(v)
    except NormSurgeonError as e:
        return str(e)
    return None


def _layer_recipes(v: Any) -> str | None:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        return "must map layer patterns to recipe strings"
    for r in v.values():
        problem = _recipe(r)
        if problem:
            return problem
    return None


def _init(v: Any) -> str | None:
    from normsurgeon.preflight import INIT_CHOICES

    return None if v is None or v in INIT_CHOICES else f"must be one of {', '.join(INIT_CHOICES)}"


def _input_norm(v: Any) -> str | None:
    from normsurgeon.preflight import INPUT_NORM_CHOICES

    ok = isinstance(v, bool) or v is None or v in INPUT_NORM_CHOICES
    return None if ok else f"must be true, false or one of {', '.join(INPUT_NORM_CHOICES)}"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _recipe_options() -> dict[str, Callable[[Any], str | None]]:
    from normsurgeon.recipes.registry import known_options

    return {name: opt.check for name, opt in known_options().items()}


STRUCTURAL: dict[str, Callable[[], dict[str, Callable[[Any], str | None]]]] = {
    "convert": lambda: {"to": _recipe, "input_shape": _shape, "keep": _patterns, "layers": _layer_recipes,
                        "init": _init, "input_norm": _input_norm, "replay": _flag, **_recipe_options()},
    "fold": lambda: {"input_shape": _shape, "keep": _patterns, "replay": _flag},
}
REQUIRED = {"convert": ("to",), "fold": ()}


# ------------------------------------------------------------------------------------ validation

def validate(raw: Any, where: str) -> Manifest:
    """A :class:`Manifest` from ``raw`` (parsed JSON), or ManifestError saying what is wrong."""
    def bad(what: str) -> ManifestError:
        return ManifestError(f"{where}: malformed manifest ({what}); the file is damaged or was not "
                             "written by normsurgeon")

    if not isinstance(raw, dict):
        raise bad(f"a {type(raw).__name__}, not an object")
    unknown = set(raw) - {"format_version", "source", "steps", "input_shape"}
    if unknown:
        raise bad(f"unknown key {sorted(unknown)[0]!r}")
    version = raw.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad("format_version must be a positive integer")
    if version > FORMAT_VERSION:
        raise ManifestError(f"{where} was written by a newer normsurgeon (format {version}; this one reads "
                            f"up to {FORMAT_VERSION}): upgrade normsurgeon")
    source = raw.get("source")
    if not isinstance(source, str) or not source.strip():
        raise bad("'source' must be a model spec string")
    if _shape(raw.get("input_shape")):
        raise bad("'input_shape' " + _shape(raw.get("input_shape")))
    steps = raw.get("steps", [])
    if not isinstance(steps, list):
        raise bad("'steps' must be a list")
    return Manifest(source=source.strip(), steps=[_step(s, i, bad, where) for i, s in enumerate(steps)],
                    input_shape=raw.get("input_shape"))


def _step(step: Any, i: int, bad, where: str) -> dict:
    if not isinstance(step, dict) or set(step) - {"verb", "args"} or not isinstance(step.get("verb"), str):
        raise bad(f"step {i + 1} must be an object with a 'verb' string and an 'args' object")
    verb, args = step["verb"], step.get("args", {})
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise bad(f"step {i + 1} ({verb}): 'args' must be an object")
    if verb in VALUE_ONLY_VERBS:
        return {"verb": verb, "args": args}
    if verb not in STRUCTURAL:
        raise ManifestError(f"{where} records step {verb!r}, which normsurgeon does not replay (replayable: "
                            f"{', '.join(STRUCTURAL)}; history only: {', '.join(VALUE_ONLY_VERBS)})")
    checks = STRUCTURAL[verb]()
    for key, value in args.items():
        if key not in checks:
            raise ManifestError(f"{where}: step {i + 1} ({verb}) has unknown argument {key!r}; "
                                f"valid: {', '.join(sorted(checks))}")
        problem = checks[key](value)
        if problem:
            raise ManifestError(f"{where}: step {i + 1} ({verb}) argument {key}={value!r}: {problem}")
    missing = [k for k in REQUIRED[verb] if k not in args]
    if missing:
        raise ManifestError(f"{where}: step {i + 1} ({verb}) lacks argument {missing[0]!r}")
    if args.get("replay") is False:
        raise ManifestError(f"{where}: step {i + 1} ({verb}) changes structure and cannot be marked replay: false")
    return {"verb": verb, "args": args}


def replay(model: Any, manifest: Manifest) -> Any:
    """Apply the manifest's structural steps, in order, with their validated arguments."""
    from normsurgeon.passes.convert import convert
    from normsurgeon.passes.fold import fold

    run = {"convert": convert, "fold": fold}
    for verb, args in manifest.structural_steps():
        args = {k: (tuple(v) if k == "keep" else v) for k, v in args.items() if k != "replay"}
        model = run[verb](model, **args, verify=False).model
    return model
