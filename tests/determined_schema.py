"""Offline stand-in for the Determined master's check of an experiment config (Determined 0.38.1).

This file implements no part of the BYOL paper (Grill et al. 2020, arXiv 2006.07733); it guards
the experiment configs in ``config/`` that run the paper's pre-training and linear evaluation
(Section 4 and Appendix C) so that a config the master would reject fails in CI, not on the cluster.

The master validates configs against the JSON schemas in ``expconf/v0`` (draft-07) plus a handful
of extension keywords that a plain ``jsonschema`` validator ignores. ``DeterminedValidator`` gives
them the master's meaning (see the README next to the schemas):

* ``optionalRef``: a ``$ref`` applied only to non-null values.
* ``union``: the value must match one of ``items``. Each item's ``unionKey`` only decides whose
  errors are reported when nothing matches (a matching keyed item, else the ``always`` items, else
  ``defaultMessage``); ``never`` items are tried but never reported. (The README says ``never``
  items are tried only when no key matched; in these schemas a ``never`` item can only accept
  values that no keyed item matches, so both readings give the same verdict.)
* ``checks``: ``{message: schema}``; a failing sub-schema is reported as ``message``.
* ``compareProperties``: ordering (``a<b``, ``a<=b``, ...) or ``a_is_subdir_of_b`` between two
  properties; skipped while either is missing or null.
* ``disallowProperties``: ``{property: message}``; the property must be absent.
* ``conditional``: ``{when | unless: schema, enforce: schema}``.
* ``eventuallyRequired`` / ``eventually``: only enforced after the master fills defaults, so the
  sanity check of a config as written ignores them; ``DeterminedCompleteValidator`` enforces them
  (a missing or null property counts as absent) for the completeness check.

``config_errors`` returns the master's verdict as readable strings ``<config>.a.b[2]: message``;
``completeness_errors`` checks that the sections the master has no defaults for (``searcher``, and
a given ``checkpoint_storage``) are complete; ``project_rule_errors`` adds this project's rules for
Determined 0.38 (script entrypoints, no deprecated length/period fields, the torch launcher for
multi-slot trials).
"""
from __future__ import annotations

import functools
import json
import posixpath
import re
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union

from jsonschema import Draft7Validator, ValidationError, validators
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

SCHEMA_ID_PREFIX = "http://determined.ai/schemas/expconf/v0/"
EXPERIMENT_SCHEMA_ID = SCHEMA_ID_PREFIX + "experiment.json"
TORCH_LAUNCHER = "python3 -m determined.launch.torch_distributed"


def find_schema_dir(repo_root: Optional[Path] = None) -> Optional[Path]:
    """Return ``<repo root>/../shared/determined-schemas``, or None when it is not available.

    ``repo_root`` defaults to this checkout's root. The directory counts only if it holds
    ``expconf/v0/experiment.json``.
    """
    root = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parents[1]
    candidate = root.parent / "shared" / "determined-schemas"
    if (candidate / "expconf" / "v0" / "experiment.json").is_file():
        return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Extension keywords. Each has jsonschema's keyword signature (validator, value, instance, schema)
# and yields ValidationErrors; errors yielded without a path sit at the instance's location.
# ---------------------------------------------------------------------------------------------
_draft7_ref = Draft7Validator.VALIDATORS["$ref"]


def _optional_ref(validator, ref, instance, schema) -> Iterator[ValidationError]:
    if instance is not None:
        yield from _draft7_ref(validator, ref, instance, schema)


def _union_key_matches(key: str, instance: Any) -> bool:
    """Whether ``instance`` selects a union item with this ``unionKey`` (``always``/``never`` are
    handled by the caller)."""
    if key.startswith("not:"):
        return not _union_key_matches(key[len("not:"):], instance)
    kind, _, arg = key.partition(":")
    if kind == "const":
        prop, _, value = arg.partition("=")
        return isinstance(instance, dict) and instance.get(prop) == value
    if kind == "hasattr":
        return isinstance(instance, dict) and arg in instance
    if kind == "singleproperty":
        return isinstance(instance, dict) and list(instance) == [arg]
    if kind == "type":
        return Draft7Validator.TYPE_CHECKER.is_type(instance, arg)
    raise ValueError(f"unknown unionKey {key!r}; expected always, never, const:P=V, hasattr:P, "
                     "singleproperty:P, type:T, or not: followed by one of those")


def _is_type_mismatch(errors: List[ValidationError]) -> bool:
    """True when an item failed only because the value itself has another JSON type."""
    return all(e.validator == "type" and not e.path for e in errors)


def _union(validator, union, instance, schema) -> Iterator[ValidationError]:
    keyed: List[List[ValidationError]] = []
    always: List[List[ValidationError]] = []
    for item in union["items"]:
        errors = list(validator.descend(instance, item))
        if not errors:
            return  # one item accepts the value: the union is satisfied
        key = item.get("unionKey", "never")
        if key == "always":
            always.append(errors)
        elif key != "never" and _union_key_matches(key, instance):
            keyed.append(errors)
    candidates = keyed or always
    # Prefer items made for this kind of value (e.g. for a list, not the "object without type" one).
    reported = [errs for errs in candidates if not _is_type_mismatch(errs)] or candidates
    if reported:
        for errors in reported:
            yield from errors
    else:
        yield ValidationError(union.get("defaultMessage", "does not match any of the allowed forms"))


def _passes(validator, instance, subschema) -> bool:
    return next(iter(validator.descend(instance, subschema)), None) is None


def _checks(validator, checks, instance, schema) -> Iterator[ValidationError]:
    for message, subschema in checks.items():
        if not _passes(validator, instance, subschema):
            yield ValidationError(message)


def _is_subdir(path: str, parent: str) -> bool:
    """True if ``path`` (relative paths count from ``parent``) normalises to a place inside
    ``parent``."""
    parent = posixpath.normpath(parent)
    full = posixpath.normpath(posixpath.join(parent, path))
    return full == parent or full.startswith(parent.rstrip("/") + "/")


_COMPARISONS = {
    "a<b": (lambda a, b: a < b, "{a} must be less than {b}"),
    "a<=b": (lambda a, b: a <= b, "{a} must be less than {b} or equal to it"),
    "a>b": (lambda a, b: a > b, "{a} must be greater than {b}"),
    "a>=b": (lambda a, b: a >= b, "{a} must be greater than {b} or equal to it"),
    "a_is_subdir_of_b": (_is_subdir, "{a} must be a subdirectory of {b}"),
}


def _compare_properties(validator, spec, instance, schema) -> Iterator[ValidationError]:
    if not isinstance(instance, dict):
        return
    a, b = instance.get(spec["a"]), instance.get(spec["b"])
    if a is None or b is None:
        return
    if spec["type"] not in _COMPARISONS:
        raise ValueError(f"unknown compareProperties type {spec['type']!r}; "
                         f"expected one of {sorted(_COMPARISONS)}")
    compare, message = _COMPARISONS[spec["type"]]
    try:
        ok = compare(a, b)
    except TypeError:
        return  # wrong types are reported by the properties' own "type" keywords
    if not ok:
        yield ValidationError(message.format(a=spec["a"], b=spec["b"]))


def _disallow_properties(validator, disallowed, instance, schema) -> Iterator[ValidationError]:
    if isinstance(instance, dict):
        for prop, message in disallowed.items():
            if prop in instance:
                yield ValidationError(message)


def _conditional(validator, spec, instance, schema) -> Iterator[ValidationError]:
    if "when" in spec:
        applies = _passes(validator, instance, spec["when"])
    else:
        applies = not _passes(validator, instance, spec["unless"])
    if applies:
        yield from validator.descend(instance, spec["enforce"])


def _ignored(validator, value, instance, schema) -> Iterator[ValidationError]:
    return iter(())


def _eventually_required(validator, required, instance, schema) -> Iterator[ValidationError]:
    if isinstance(instance, dict):
        for prop in required:
            if instance.get(prop) is None:
                yield ValidationError(f"{prop} is a required property")


def _eventually(validator, subschema, instance, schema) -> Iterator[ValidationError]:
    yield from validator.descend(instance, subschema)


_EXTENSIONS = {
    "optionalRef": _optional_ref,
    "union": _union,
    "checks": _checks,
    "compareProperties": _compare_properties,
    "disallowProperties": _disallow_properties,
    "conditional": _conditional,
}
DeterminedValidator = validators.extend(
    Draft7Validator, {**_EXTENSIONS, "eventuallyRequired": _ignored, "eventually": _ignored})
DeterminedCompleteValidator = validators.extend(
    Draft7Validator,
    {**_EXTENSIONS, "eventuallyRequired": _eventually_required, "eventually": _eventually})


# ---------------------------------------------------------------------------------------------
# Loading schemas and reporting errors.
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _registry(schema_dir: str) -> Registry:
    expconf = Path(schema_dir) / "expconf" / "v0"
    files = sorted(expconf.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no schemas in {expconf}; expected expconf/v0/*.json under the "
                                "determined-schemas directory")
    resources = []
    for path in files:
        contents = json.loads(path.read_text())
        if "$id" not in contents:
            raise ValueError(f"schema {path} has no $id; every expconf schema needs one")
        # jsonschema picks the validator class of a referenced schema from its "$schema"; the
        # draft-07 URL would select the plain Draft7Validator and drop the extension keywords.
        contents.pop("$schema", None)
        resources.append((contents["$id"], Resource.from_contents(contents, DRAFT7)))
    return Registry().with_resources(resources)


@functools.lru_cache(maxsize=64)
def validator_for(schema_id: str, schema_dir: str, complete: bool = False) -> Any:
    """A validator for the schema with this ``$id`` (e.g. ``EXPERIMENT_SCHEMA_ID``):
    ``DeterminedCompleteValidator`` if ``complete``, else ``DeterminedValidator``."""
    registry = _registry(schema_dir)
    try:
        schema = registry.contents(schema_id)
    except LookupError:
        raise ValueError(f"unknown schema id {schema_id!r}; expected "
                         f"{SCHEMA_ID_PREFIX}<name>.json for a file in {schema_dir}") from None
    cls = DeterminedCompleteValidator if complete else DeterminedValidator
    return cls(schema, registry=registry)


def format_path(path) -> str:
    """``['a', 'b', 2]`` -> ``<config>.a.b[2]`` (the master's notation)."""
    return "<config>" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def schema_errors(instance: Any, schema_id: str, schema_dir: Union[str, Path],
                  complete: bool = False) -> List[str]:
    """Errors of ``instance`` against one schema, as sorted ``<config>.path: message`` strings;
    ``complete`` also enforces ``eventuallyRequired``/``eventually``."""
    validator = validator_for(schema_id, str(schema_dir), complete)
    messages = {f"{format_path(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)}
    return sorted(messages)


def config_errors(config: dict, schema_dir: Union[str, Path]) -> List[str]:
    """The master's verdict on an experiment config as written: an empty list when it is valid."""
    if not isinstance(config, dict):
        return [f"<config>: an experiment config must be a mapping, got {type(config).__name__}"]
    return schema_errors(config, EXPERIMENT_SCHEMA_ID, schema_dir)


def completeness_errors(config: dict, schema_dir: Union[str, Path]) -> List[str]:
    """Completeness of the sections the master cannot default: ``searcher`` (e.g. ``metric``) and,
    when given, ``checkpoint_storage`` (e.g. ``host_path`` or ``bucket``; stricter than the master,
    which may merge in the cluster's storage of the same type)."""
    if not isinstance(config, dict):
        return [f"<config>: an experiment config must be a mapping, got {type(config).__name__}"]
    errors = []
    if config.get("searcher") is None:
        errors.append("<config>.searcher: required; the master has no default searcher")
    for key, schema in (("searcher", "searcher.json"), ("checkpoint_storage", "checkpoint-storage.json")):
        if config.get(key) is not None:
            section = schema_errors(config[key], SCHEMA_ID_PREFIX + schema, schema_dir, complete=True)
            errors += [e.replace("<config>", f"<config>.{key}", 1) for e in section]
    return errors


# ---------------------------------------------------------------------------------------------
# Project rules for Determined 0.38 (beyond what the schema can say).
# ---------------------------------------------------------------------------------------------
_MODULE_CLASS = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_DEPRECATED_TOP_LEVEL = ("min_validation_period", "min_checkpoint_period", "optimizations",
                         "scheduling_unit")


def project_rule_errors(config: dict) -> List[str]:
    """Rules this project's configs follow on Determined 0.38, as readable messages.

    * ``entrypoint`` is one string launching ``model_def.py`` as a script (0.38 no longer runs the
      legacy ``module:TrialClass`` form);
    * no ``searcher.max_length``, ``min_validation_period``, ``min_checkpoint_period``,
      ``optimizations`` or ``scheduling_unit`` (deprecated: lengths and periods live in the
      training code's hyperparameters);
    * ``resources.slots_per_trial > 1`` launches through ``determined.launch.torch_distributed``.
    """
    if not isinstance(config, dict):
        return [f"<config>: an experiment config must be a mapping, got {type(config).__name__}"]
    errors = []
    entrypoint = config.get("entrypoint")
    if not isinstance(entrypoint, str):
        errors.append(f"<config>.entrypoint: must be a command string launching model_def.py, "
                      f"got {entrypoint!r}")
    else:
        if "model_def.py" not in entrypoint:
            errors.append(f"<config>.entrypoint: must launch the script model_def.py, "
                          f"got {entrypoint!r}")
        legacy = [tok for tok in entrypoint.split() if _MODULE_CLASS.match(tok)]
        if legacy:
            errors.append(f"<config>.entrypoint: legacy 'module:Class' form {legacy[0]!r} is not "
                          "run by Determined 0.38; launch a script, e.g. "
                          f"'{TORCH_LAUNCHER} python3 model_def.py ...'")
    for key in _DEPRECATED_TOP_LEVEL:
        if key in config:
            errors.append(f"<config>.{key}: deprecated in Determined 0.38; remove it (lengths and "
                          "periods belong in the training code's hyperparameters)")
    searcher = config.get("searcher")
    if isinstance(searcher, dict) and "max_length" in searcher:
        errors.append("<config>.searcher.max_length: deprecated in Determined 0.38; put the "
                      "training length in the hyperparameters")
    resources = config.get("resources") or {}
    slots = resources.get("slots_per_trial") if isinstance(resources, dict) else None
    if isinstance(slots, int) and slots > 1:
        if not (isinstance(entrypoint, str) and entrypoint.strip().startswith(TORCH_LAUNCHER)):
            errors.append(f"<config>.entrypoint: resources.slots_per_trial={slots} needs the "
                          f"entrypoint to start with '{TORCH_LAUNCHER}', got {entrypoint!r}")
    return errors
