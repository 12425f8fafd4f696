"""Recipe registry and parser. Imports torch lazily: ``--help`` lists recipes without it."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from normsurgeon.errors import RecipeError, did_you_mean

# Modules whose import registers recipes. Order is the order ``--help`` lists them.
_BUILTIN_MODULES = ("normsurgeon.recipes.basic", "normsurgeon.recipes.papers", "normsurgeon.recipes.iteration")
_REGISTRY: dict[str, "RecipeEntry"] = {}
_LOADED = False


@dataclass(frozen=True)
class Recipe:
    """A parsed ``--to`` value: registry name, its argument (or the default), and options."""

    name: str
    arg: Any = None
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}:{self.arg}"


@dataclass
class BuildContext:
    """What a recipe's builder sees for one BatchNorm layer."""

    name: str  # qualified name of the BN layer (module path or node name)
    bn: Any  # the BatchNorm module (an nn.modules.batchnorm._BatchNorm)
    input_shape: tuple[int, ...] | None  # shape seen on the probe input, if known
    producer: Any = None  # the module producing the BN input, when it is a module
    producer_name: str | None = None
    recipe: Recipe | None = None
    notes: list[str] = field(default_factory=list)  # builder's remarks, copied into the Change


@dataclass
class Replacement:
    """What replaces one BN layer.

    ``norm``: the module in the BN's place. ``producer``: a module to put in place of the producing
    conv (weight standardization), or None. ``after_activation``: a module to insert after the
    activation that consumes the norm (proxy normalization), built from that activation, or None.
    """

    norm: Any
    producer: Any = None
    after_activation: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class RecipeOption:
    """A keyword option a recipe reads (``Recipe.option``): its name, what it takes, and a check that
    returns an error message or None."""

    name: str
    help: str
    check: Callable[[Any], str | None]


def _positive_number(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and 0 < v < float("inf")
    return None if ok else "must be a finite positive number"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def unit_rate(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else "must be a number in (0, 1]"


def nonnegative_int(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be an integer >= 0"


WS_OPTIONS = (RecipeOption("ws_form", "var = sqrt(var + eps), std = std + eps", _one_of("var", "std")),
              RecipeOption("ws_eps", "weight standardization epsilon", _positive_number))
PN_OPTIONS = (RecipeOption("pn_eps", "proxy normalization epsilon", _positive_number),
              RecipeOption("pn_norm_eps", "epsilon of the norm before proxy normalization", _positive_number))
BCN_OPTIONS = (RecipeOption("bcn_estimate", "use running estimates in the BN part", _boolean),
               RecipeOption("bcn_rate", "update rate of the running estimates", unit_rate))


@dataclass(frozen=True)
class LayerSpec:
    """A layer class a recipe creates: ``cls`` is the class or ``"module:Class"`` (imported on first
    use, so listing recipes needs no torch). ``norm``: a normalization layer whose ``weight``/``bias``
    are its scale and shift (counted as a norm by inspect and diagnose; re-initialized by ``--init``).
    ``leaf``: torch.fx keeps it whole (a container whose parts fold separately is not a leaf)."""

    cls: Any
    norm: bool = True
    leaf: bool = True

    def resolve(self) -> type:
        if isinstance(self.cls, str):
            module, _, name = self.cls.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.cls


@dataclass(frozen=True)
class RecipeEntry:
    name: str
    summary: str  # one line, shown by --help and inspect
    build: Callable[[BuildContext], Replacement]
    arg_name: str | None = None  # e.g. "groups"; None: takes no argument
    arg_type: Callable[[str], Any] | None = None
    default: Any = None
    batch_independent_train: bool = True  # claim checked by tests
    folds: str = "yes"  # yes | partial | no: what `fold` can remove at eval
    check_arg: Callable[[Any], str | None] | None = None  # returns an error message or None
    options: tuple[RecipeOption, ...] = ()  # keyword options its builder reads
    layers: tuple[LayerSpec, ...] = ()  # the layer classes its builder creates (torch's own need none)

    def usage(self) -> str:
        return self.name if self.arg_name is None else f"{self.name}[:{self.arg_name.upper()}]"


def register(entry: RecipeEntry) -> RecipeEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"recipe {entry.name!r} registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a recipe (for code that registered one for a while, e.g. a test)."""
    _REGISTRY.pop(name, None)


def layer_classes(*, norm: bool | None = None, leaf: bool | None = None) -> tuple[type, ...]:
    """The layer classes registered recipes declare, filtered by their ``norm``/``leaf`` flags: what
    tracing keeps whole, what counts as a norm layer with a scale. Built from the registry on every
    call, so a recipe registered at run time is covered at once."""
    out: list[type] = []
    for entry in all_recipes():
        for spec in entry.layers:
            if (norm is None or spec.norm == norm) and (leaf is None or spec.leaf == leaf):
                cls = spec.resolve()
                if cls not in out:
                    out.append(cls)
    return tuple(out)


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in _BUILTIN_MODULES:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:  # a recipe module not written yet
                if e.name != mod:
                    raise


def all_recipes() -> list[RecipeEntry]:
    _load()
    return list(_REGISTRY.values())


def get_entry(name: str) -> RecipeEntry:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(
            f"unknown recipe {name!r}{did_you_mean(name, _REGISTRY)}; valid recipes: "
            f"{', '.join(e.usage() for e in all_recipes())}"
        ) from None


def known_options() -> dict[str, RecipeOption]:
    """Every keyword option any registered recipe reads, by name."""
    return {o.name: o for e in all_recipes() for o in e.options}


def check_options(options: dict[str, Any], recipes: list["Recipe"] | None = None) -> None:
    """Raise RecipeError for an option no recipe knows, a bad value, or (given ``recipes``) an option
    none of those recipes reads."""
    known = known_options()
    for key, value in options.items():
        opt = known.get(key)
        if opt is None:
            raise RecipeError(f"unknown recipe option {key!r}{did_you_mean(key, known)}; valid options: "
                              f"{', '.join(sorted(known))}")
        problem = opt.check(value)
        if problem:
            raise RecipeError(f"bad recipe option {key}={value!r}: {problem}")
        if recipes is not None and not any(key in {o.name for o in get_entry(r.name).options} for r in recipes):
            users = [e.name for e in all_recipes() if key in {o.name for o in e.options}]
            raise RecipeError(f"option {key!r} does not apply to recipe {', '.join(sorted({str(r) for r in recipes}))}; "
                              f"it applies to {', '.join(users)}")


def parse_recipe(text: str, **options: Any) -> Recipe:
    """Parse ``NAME[:ARG]`` against the registry; raise RecipeError with the valid list otherwise.
    ``options`` must be known recipe options with valid values (:func:`check_options`)."""
    if not isinstance(text, str):
        raise RecipeError(f"a recipe is a string like gn+ws or gn:16, not {type(text).__name__}")
    check_options(options)
    text = text.strip().lower()
    name, sep, raw = text.partition(":")
    entry = get_entry(name)
    if not sep:
        arg = entry.default
    elif entry.arg_name is None:
        raise RecipeError(f"recipe {name!r} takes no argument; write --to {name}")
    else:
        try:
            arg = entry.arg_type(raw) if entry.arg_type else raw
        except ValueError:
            raise RecipeError(
                f"bad argument {raw!r} for recipe {name!r}: expected {entry.usage()}"
            ) from None
    if entry.check_arg is not None and arg is not None:
        problem = entry.check_arg(arg)
        if problem:
            raise RecipeError(f"bad argument for recipe {name!r}: {problem}")
    return Recipe(name=name, arg=arg, options=tuple(sorted(options.items())))
