"""Config checks made before a bundle run does anything: override ids, and every value's type, read from the config.

No second list of kinds is kept by hand. A value is checked against:

- **its default in the config** (a command-line override only): it must be of the default's JSON kind: a boolean
  stays a boolean (``--resume true`` reaches the run as the text ``'true'``), a number a number, a text a text, a
  list a list of items of the default items' kind; a top-level list of numbers (a patch size, a spacing) keeps its
  length, since its items are spatial axes, unless every parameter it feeds states its own length bounds;
- **the constructors and functions it feeds**: each place where the config passes the value whole (a component's
  argument, ``"lr": "@learning_rate"``, or a keyword of a call in an expression, ``f(val_fraction=@val_fraction)``)
  is found in the raw config, and the value must satisfy that parameter's annotation (validated strictly with
  pydantic). Ranges and choices live in the annotations of the project's own functions (``Annotated[int, Gt(0)]``,
  ``Literal[...]`` built from the Python constant that holds the choices); for engine parameters whose constructors
  declare no range, :data:`CONSTRUCTOR_CONSTRAINTS` says so once, keyed by constructor, not by config id.

A constructor that still refuses a value at build time (``UNet`` given channels and strides of unequal lengths) is
reported by :func:`clinseg.pipelines.cli.report_error` as a config error naming the override that fed it
(:func:`override_feeds`).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import os
import re
import sys
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cache
from typing import Any

from clinseg.datasets.errors import ConfigError
from clinseg.datasets.value_types import PositiveFloat, PositiveInt, PositiveSpacing, Probability

# the options of ``monai.bundle run`` itself: everything else on its command line is a config override
RUN_OPTIONS = {
    "run_id",
    "init_id",
    "final_id",
    "meta_file",
    "config_file",
    "logging_file",
    "tracking",
    "args_file",
    "workflow_type",
    "workflow_name",
    "properties_path",
}
_SPECIAL_KEYS = {"_target_", "_disabled_", "_desc_", "_requires_", "_mode_"}
_REFERENCE = re.compile(r"@([\w#:]+)")

# ranges the engines' constructors take but neither annotate nor check when built (ignite checks max_epochs only
# when the run starts, after tracking has begun): (constructor's qualified name, parameter) -> annotation
CONSTRUCTOR_CONSTRAINTS = {
    ("monai.engines.trainer.SupervisedTrainer", "max_epochs"): PositiveInt,
    ("monai.handlers.validation_handler.ValidationHandler", "interval"): PositiveInt,
    ("monai.transforms.spatial.dictionary.Spacingd", "pixdim"): PositiveSpacing,
}


def option_values(tokens: list[str]) -> dict[str, str]:
    """The ``--key value`` and ``--key=value`` options of a MONAI bundle command line (``fire`` reads them so),
    keyed without the dashes; other tokens (the run id) are skipped."""
    options, index = {}, 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not token.startswith("--"):
            continue
        key, has_value, value = token[2:].partition("=")
        if not has_value and index < len(tokens) and not tokens[index].startswith("--"):
            value, index = tokens[index], index + 1
        options[key.replace("-", "_") if "#" not in key else key] = value
    return options


def command_line_overrides(argv: list[str] | None = None) -> tuple[list[str], dict[str, str]] | None:
    """The config files and the ``--id value`` overrides of a ``python -m monai.bundle run`` command line (also
    under ``torchrun``); None for any other program."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or not argv[0].replace(os.sep, "/").endswith("monai/bundle/__main__.py") or argv[1] != "run":
        return None
    overrides = option_values(argv[2:])
    files = overrides.get("config_file", "")
    try:
        parsed = ast.literal_eval(files)
    except (ValueError, SyntaxError):
        parsed = files
    files = [str(f) for f in parsed] if isinstance(parsed, (list, tuple)) else [f for f in str(parsed).split(",") if f]
    return files, overrides


def config_ids(node, prefix: str = "") -> dict[str, object]:
    """Every id of a raw config (``train#trainer#max_epochs``) and its raw value."""
    ids = {}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        name = f"{prefix}#{key}" if prefix else str(key)
        ids[name] = value
        ids.update(config_ids(value, name))
    return ids


def resolve_target(target: str, locator=None) -> Callable | None:
    """The callable a ``_target_`` names, found the way MONAI finds it (``"UNet"`` -> ``monai.networks.nets.UNet``);
    None when it cannot be found. ``locator``: the ``ComponentLocator`` of the run's ``ConfigParser``, which scans
    the loaded ``monai`` modules once for the whole run (a new one per target took about two seconds per run)."""
    from pydoc import locate

    from monai.bundle import ConfigComponent

    try:
        return locate(ConfigComponent({"_target_": target}, locator=locator).resolve_module_name())
    except Exception:  # noqa: BLE001 - a target that cannot be resolved is not second-guessed
        return None


def _parameters(obj) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return None


def _accepts_new_setting(component, name: str) -> bool:
    """Whether ``name`` can be added to ``component``: MONAI's special keys, any key of a plain dict, and a
    parameter that a ``_target_``'s constructor takes (``--network_def#act PRELU``), but not a misspelt one
    (``--network_def#chanels``)."""
    if isinstance(component, list):
        return name.isdigit()
    if not isinstance(component, dict):
        return False
    if name in _SPECIAL_KEYS or "_target_" not in component:
        return True
    parameters = _parameters(resolve_target(component["_target_"]))
    if parameters is None:
        return True
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def check_override_keys(files: list[str], overrides: Mapping[str, object]) -> None:
    """Refuse a command-line override whose id the config does not have (``--batchsize 1`` would otherwise be
    ignored, and the run use the default), naming the nearest id. A new setting inside an existing component
    (``--handlers#0#_disabled_ True``) is accepted."""
    from monai.bundle import ConfigParser

    ids = config_ids(ConfigParser.load_config_files(files))
    for key in overrides:
        normalized = key.replace("::", "#")
        if key in RUN_OPTIONS or normalized in ids:
            continue
        parent, _, name = normalized.rpartition("#")
        component = ids.get(parent)
        # judged by the class the run builds: ``--optimizer#_target_ torch.optim.SGD --optimizer#momentum 0.99``
        target = next((v for k, v in overrides.items() if k.replace("::", "#") == f"{parent}#_target_"), None)
        if isinstance(component, dict) and isinstance(target, str):
            component = {**component, "_target_": target}
        if parent and _accepts_new_setting(component, name):
            continue
        # an id that ends in the key (``max_epochs`` -> ``train#trainer#max_epochs``) before a similar spelling
        nearest = [i for i in ids if i.endswith(f"#{normalized}")][:1]
        nearest = nearest or difflib.get_close_matches(normalized, list(ids), n=1, cutoff=0.6)
        hint = f"Did you mean --{nearest[0]}?" if nearest else "See the bundle's configs for the ids it has."
        raise ConfigError(key, "is not an id of this bundle's config, so its value would be ignored.", hint)


def check_bundle_root(files: list[str], overrides: Mapping[str, object], parser) -> None:
    """Refuse a run whose config files belong to one bundle folder while ``bundle_root`` is another one only by
    default: the configs' ``bundle_root`` is relative to the working folder, so a copied bundle's configs run without
    ``--bundle_root`` read the model and write the outputs of whatever bundle of that name the working folder holds
    (the repository's, run from its root). Given on the command line, any ``bundle_root`` is the user's choice."""
    from pathlib import Path

    if "bundle_root" in overrides or "bundle_root" not in parser:
        return
    root = Path(str(parser.get_parsed_content("bundle_root"))).resolve()
    for file in files:
        folder = Path(file).resolve().parent
        if folder.name != "configs" or not (folder / "metadata.json").is_file():
            continue  # not a bundle's config folder (an overlay kept elsewhere)
        if folder.parent != root:
            raise ConfigError(
                "bundle_root",
                f"is {root} (the config's default, relative to the working folder), but {file} is a config of the "
                f"bundle folder {folder.parent}: the run would use the model of {root.name} in {root.parent} and "
                "write its outputs there, not in the bundle it was started from.",
                f"Pass --bundle_root {folder.parent}.",
            )


CLASS_NAME_MAX_LENGTH = 64
"""Longer class names would push the per-class metric names past MLflow's 250 characters (the request refused)."""


def check_class_names(parser) -> None:
    """Refuse class names that cannot each stand for one class everywhere they are used: per-class metrics are
    recorded under the names made valid for MLflow (``PED (serous)`` as ``PED _serous_``), so two names that become
    one would record one class's values under the other's; an empty or overlong name, or fewer than two classes
    (background and one structure), is refused too."""
    from clinseg.pipelines.tracking import mlflow_class_name

    if "class_names" not in parser:
        return
    names = parser.get_parsed_content("class_names")
    if not isinstance(names, (list, tuple)) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise ConfigError("class_names", f"got {names!r}: expected a list of at least two names (background first).")
    for name in names:
        if not name.strip() or len(name) > CLASS_NAME_MAX_LENGTH:
            raise ConfigError("class_names", f"{name!r}: a class name must be 1 to {CLASS_NAME_MAX_LENGTH} characters.")
    clash = clashing_class_names(names)
    if clash:
        first, second = clash
        raise ConfigError(
            "class_names",
            f"{first!r} and {second!r} are recorded under one name ({mlflow_class_name(second)!r}): their "
            "per-class metrics and result keys would mix.",
            "Name the classes so that they differ in letters or digits.",
        )


def clashing_class_names(names: Sequence[str]) -> tuple[str, str] | None:
    """The first two of ``names`` that MLflow records under one name (``PED (serous)`` and ``PED [serous]`` both as
    ``PED _serous_``; names that differ only in case share a file on case-insensitive file systems), or None."""
    from clinseg.pipelines.tracking import mlflow_class_name

    recorded: dict[str, str] = {}
    for name in names:
        key = mlflow_class_name(name).casefold()
        if key in recorded:
            return recorded[key], name
        recorded[key] = name
    return None


def check_key_metric(parser) -> None:
    """Refuse a key metric where lower is better (a distance, an error, a loss): the best checkpoint, the decision
    rule and promotion keep the highest value of the key metric, so they would keep the worst model."""
    from clinseg.pipelines.tracking import lower_is_better

    if "key_metric_name" not in parser:
        return
    name = str(parser.get_parsed_content("key_metric_name"))
    if lower_is_better(name):
        raise ConfigError(
            "key_metric_name",
            f"is {name!r}, a metric where lower is better; the best checkpoint and promotion keep the highest key "
            "metric, so they would keep the worst model.",
            "Choose an overlap metric as the key (Dice, F1, IoU); distances and errors are reported beside it.",
        )


# ---- where each value goes -------------------------------------------------------------------------------------


def _qualified_name(obj) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', repr(obj)))}"


def _calls_in_expression(expression: str, namespace: Mapping[str, Any]) -> Iterator[tuple[Callable, str, str]]:
    """``(callable, parameter, id)`` for each ``@id`` passed whole as an argument of a call in ``expression``."""
    references = {}

    def placeholder(match: re.Match) -> str:
        name = f"__ref_{len(references)}"
        references[name] = match[1]
        return name

    try:
        tree = ast.parse(_REFERENCE.sub(placeholder, expression[1:]).strip(), mode="eval")
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        passed = {i: a.id for i, a in enumerate(node.args) if isinstance(a, ast.Name) and a.id in references}
        named = {k.arg: k.value.id for k in node.keywords if isinstance(k.value, ast.Name) and k.value.id in references}
        if not passed and not named:
            continue
        try:  # only dotted names of imported modules: nothing with side effects is evaluated
            source = ast.unparse(node.func)
            if not re.fullmatch(r"[\w.]+", source):
                continue
            function = eval(source, dict(namespace))  # noqa: S307 - a dotted name from the bundle's own config
        except Exception:  # noqa: BLE001 - a name the imports do not give is not checked
            continue
        parameters = _parameters(function)
        if parameters is None:
            continue
        positional = [
            name for name, p in parameters.items()
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]  # fmt: skip
        for index, placeholder_name in passed.items():
            if index < len(positional):
                yield function, positional[index], references[placeholder_name]
        for keyword, placeholder_name in named.items():
            if keyword in parameters:
                yield function, keyword, references[placeholder_name]


def value_destinations(
    config: Mapping, namespace: Mapping[str, Any], locator=None
) -> dict[str, list[tuple[Callable, str]]]:
    """For each config id, the ``(callable, parameter)`` pairs its value is passed to whole, following plain
    aliases (``"sw_roi_size": "@patch_size"`` sends ``patch_size`` wherever ``sw_roi_size`` goes); ``locator`` as
    for :func:`resolve_target`."""
    destinations: dict[str, list[tuple[Callable, str]]] = {}
    aliases: dict[str, list[str]] = {}  # id -> the ids whose whole value is "@id"
    for name, value in config_ids(config).items():
        if isinstance(value, dict) and "_target_" in value and isinstance(value["_target_"], str):
            function = resolve_target(value["_target_"], locator)
            parameters = _parameters(function) if function is not None else None
            for key, argument in value.items():
                if parameters is None or key in _SPECIAL_KEYS or key not in parameters:
                    continue
                destinations.setdefault(f"{name}#{key}", []).append((function, key))
                if isinstance(argument, str) and _REFERENCE.fullmatch(argument):
                    destinations.setdefault(argument[1:], []).append((function, key))
        elif isinstance(value, str) and _REFERENCE.fullmatch(value):
            aliases.setdefault(value[1:], []).append(name)
        elif isinstance(value, str) and value.startswith("$"):
            for function, parameter, referenced in _calls_in_expression(value, namespace):
                destinations.setdefault(referenced, []).append((function, parameter))
    resolved = {}
    for name in set(destinations) | set(aliases):
        found, pending, seen = [], [name], set()
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            found.extend(destinations.get(current, []))
            pending.extend(aliases.get(current, []))
        resolved[name] = found
    return resolved


# ---- the checks ------------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _default_kind_problem(default, value, top_level: bool) -> str | None:
    """What ``value`` should have been, judged by the config's ``default``; None when it is of the same kind."""
    if default is None or (isinstance(default, str) and default[:1] in "$@%"):
        return None  # no default kind: a computed value, a reference, or null
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "True or False (capitalised on the command line: --key True)"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, expected = _is_number(value), "a number"
    elif isinstance(default, str):
        ok, expected = isinstance(value, str) and value != "", "a non-empty text"
    elif isinstance(default, list):
        numbers = bool(default) and all(_is_number(d) for d in default)
        integers = numbers and all(isinstance(d, int) for d in default)
        fixed = top_level and numbers
        kind = "integers" if integers else "numbers" if numbers else "items"
        expected = f"a list of {len(default) if fixed else 'one or more'} {kind}" + (" (one per axis)" if fixed else "")
        ok = isinstance(value, (list, tuple)) and bool(value) and (not fixed or len(value) == len(default))
        if ok and numbers:
            ok = all(isinstance(v, int) and not isinstance(v, bool) if integers else _is_number(v) for v in value)
        elif ok and default and all(isinstance(d, str) for d in default):
            ok, kind = all(isinstance(v, str) and v for v in value), "texts"
            expected = "a list of one or more texts"
    elif isinstance(default, dict):
        ok, expected = isinstance(value, dict), "a mapping ({...})"
    else:
        return None
    return None if ok else expected


def _as_tuples(value):
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_tuples(v) for k, v in value.items()}
    return value


@cache
def _type_adapter(annotation):
    from pydantic import ConfigDict, TypeAdapter

    try:
        return TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True))
    except Exception:  # noqa: BLE001 - an annotation pydantic cannot express is not checked
        return None


def _annotation(function: Callable, parameter: str):
    key = (_qualified_name(function), parameter)
    if key in CONSTRUCTOR_CONSTRAINTS:
        return CONSTRUCTOR_CONSTRAINTS[key]
    if parameter == "prob" and _is_subclass(function, "monai.transforms", "RandomizableTransform"):
        return Probability  # MONAI clamps a probability outside [0, 1] without a word
    if parameter == "lr" and _is_subclass(function, "torch.optim", "Optimizer"):
        return PositiveFloat  # torch checks it only when the optimiser is built, after tracking has begun
    target = function.__init__ if inspect.isclass(function) else function
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable string annotations are not checked
        return None
    return hints.get(parameter)


def _is_subclass(function, module: str, name: str) -> bool:
    import importlib

    return inspect.isclass(function) and issubclass(function, getattr(importlib.import_module(module), name))


def _annotation_problem(annotation, value) -> str | None:
    """None when ``value`` satisfies ``annotation`` (strictly: no text read as a number; a JSON list may stand for
    a tuple), else pydantic's description of the first problem."""
    from pydantic import ValidationError

    adapter = None if annotation is None or annotation is typing.Any else _type_adapter(annotation)
    if adapter is None:
        return None
    try:
        adapter.validate_python(value, strict=True)
        return None
    except ValidationError as error:
        first = error.errors()[0]["msg"]
    except Exception:  # noqa: BLE001 - a validator that itself fails is not the user's problem
        return None
    try:
        adapter.validate_python(_as_tuples(value), strict=True)
        return None
    except Exception:  # noqa: BLE001
        return first


def check_values(parser, defaults: Mapping | None = None, overrides: Mapping[str, object] = ()) -> None:
    """Check the run's values before anything runs; a :class:`ConfigError` names the first wrong key.

    Checked: every override (against its default's kind and the parameters it feeds) and every top-level plain
    value of the config (against the parameters it feeds). ``parser``: the run's ``ConfigParser`` (overrides
    applied); ``defaults``: the raw config files without overrides."""
    raw = parser.get()
    destinations = value_destinations(raw, getattr(parser, "globals", {}) or {}, getattr(parser, "locator", None))
    default_ids = config_ids(defaults) if defaults is not None else {}
    keys = [key.replace("::", "#") for key in overrides if key not in RUN_OPTIONS]
    keys += [key for key, value in raw.items() if key not in keys and _is_plain(value)]
    for key in keys:
        if key.rpartition("#")[2] in _SPECIAL_KEYS or key not in parser:
            continue
        value = _value_before_the_run(parser, key)
        if value is _BUILT_BY_THE_RUN:
            continue
        if key in overrides or key.replace("#", "::") in overrides:
            per_axis = "#" not in key and not _any_length(destinations.get(key, []))
            expected = _default_kind_problem(default_ids.get(key), value, top_level=per_axis)
            if expected is not None:
                raise ConfigError(key, f"expected {expected}, got {value!r} ({type(value).__name__}).", _fix(key))
        if not _is_plain(value):
            continue
        for function, parameter in destinations.get(key, []):
            annotation = _annotation(function, parameter)
            problem = _annotation_problem(annotation, value)
            if problem is not None:
                raise ConfigError(
                    key,
                    f"got {value!r} ({type(value).__name__}): {problem[:1].lower()}{problem[1:]}"
                    f" ({getattr(function, '__name__', function)}'s {parameter}).",
                    _fix(key),
                )


def _any_length(destinations: list[tuple[Callable, str]]) -> bool:
    """True when every parameter a value feeds states the length it takes itself, in its annotation
    (``Annotated[Sequence[...], MinLen(1)]``: test-time scales, as many as wanted): the default's length is then no
    rule. A plain ``Sequence[...]`` (a patch size, a spacing) says nothing about its length, and a top-level list of
    numbers keeps its default's, one item per spatial axis."""
    from annotated_types import Len, MaxLen, MinLen

    if not destinations:
        return False
    for function, parameter in destinations:
        annotation = _annotation(function, parameter)
        if typing.get_origin(annotation) is not typing.Annotated:
            return False
        if not any(isinstance(meta, (Len, MinLen, MaxLen)) for meta in annotation.__metadata__):
            return False
    return True


def _fix(key: str) -> str:
    return f"Fix it in the config or on the command line (--{key} ...)."


_BUILT_BY_THE_RUN = object()


def _value_before_the_run(parser, key: str):
    """The value ``key`` will have, as far as it is known before anything is built: a plain setting as written, an
    expression evaluated; ``_BUILT_BY_THE_RUN`` for a component (``{"_target_": ...}``, an ``lr_scheduler`` given on
    the command line) and for an expression over components (``$@network.parameters()``), which only the run builds
    (resolving them unbuilt hands an expression a ``ConfigComponent`` in place of the object it describes)."""
    raw = parser[key]
    if _is_plain(raw):
        return raw
    if isinstance(raw, dict) and "_target_" in raw:
        return _BUILT_BY_THE_RUN
    try:
        return parser.get_parsed_content(key, instantiate=False)
    except Exception:  # noqa: BLE001 -- an expression over components; a wrong one fails where the run builds it
        return _BUILT_BY_THE_RUN
    finally:
        # the run resolves lazily, reusing what was resolved before: nothing resolved unbuilt here may be reused
        parser.ref_resolver.reset()


def _is_plain(value) -> bool:
    """A setting written in the config, not computed: numbers, booleans, texts that are no expression or
    reference, null, and lists and mappings of those."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return value[:1] not in "$@%"
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return "_target_" not in value and all(_is_plain(v) for v in value.values())
    return False


def override_feeds(target: str, argv: list[str] | None = None) -> str | None:
    """The command-line override that sets a setting of a component whose ``_target_`` resolves to ``target``,
    directly (``--network_def#channels``) or through a reference (``--learning_rate`` behind ``"lr":
    "@learning_rate"``); None when no override reaches it."""
    from monai.bundle import ConfigComponent, ConfigParser

    found = command_line_overrides(argv)
    if found is None or not found[0]:
        return None
    files, overrides = found
    ids = config_ids(ConfigParser.load_config_files(files))
    for name, value in ids.items():
        if not (isinstance(value, dict) and isinstance(value.get("_target_"), str)):
            continue
        try:
            resolved = ConfigComponent({"_target_": value["_target_"]}).resolve_module_name()
        except Exception:  # noqa: BLE001
            continue
        if resolved != target and value["_target_"] != target:
            continue
        for key in overrides:
            normalized = key.replace("::", "#")
            if normalized.startswith(f"{name}#"):
                return key
            if any(isinstance(a, str) and re.search(rf"@{re.escape(normalized)}\b", a) for a in value.values()):
                return key
    return None
