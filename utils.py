"""The one error path of every command (``model_def.py``, ``evaluate_result.py``,
``generate_blob_list.py``): the errors a user can fix, printed as ``error: <message>`` on one line
(:func:`run_command`), and the output-path checks made before any work starts."""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Optional


class CommandError(Exception):
    """An expected failure of a command (bad input, a fault that ended a run): the command prints
    ``error: <message>`` on one line and exits with ``exit_code``, without a traceback
    (:func:`run_command`)."""

    exit_code = 1
    quiet = False  # already said (e.g. by rank 0 of several processes): exit without printing


class InputError(CommandError, ValueError):
    """Bad input the user can fix (a value, a file, a path, a checkpoint); the message names the bad
    value and what would be right. Commands exit with code 2."""

    exit_code = 2


class ConfigError(InputError):
    """A configuration value is not allowed; the message names the key and what would be right."""


# ----------------------------------------------------------------------------- config values
# Shared by the sections' owners (runtime/settings.py, data.py, runtime/classifier.py, runtime/gcs_client.py).
def reject(key: str, value: Any, allowed: str) -> None:
    """Raises the one-line :class:`ConfigError` naming a config ``key``, its ``value`` and what is allowed."""
    raise ConfigError(f"config key {key!r} has value {value!r}: {allowed}")


def check_keys(section: dict, cls, prefix: str) -> None:
    """``section`` is a mapping whose keys are fields of the dataclass ``cls`` (``prefix``: its place in the config)."""
    if not isinstance(section, dict):
        reject(prefix.rstrip("."), section, "expected a mapping")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in section:
        if key not in known:
            reject(prefix + key, section[key], f"unknown key; known keys: {', '.join(sorted(known))}")


def checked_number(section: dict, key: str, prefix: str, kind=float, minimum=None, maximum=None,
                   exclusive_min=False, optional=False):
    """``section[key]`` as a finite ``kind`` within the bounds, or a :class:`ConfigError`."""
    value = section[key]
    if value is None and optional:
        return None
    if kind is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-1 (no dot) as a string; it is the number the user meant.
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, float) and not math.isfinite(value):
        reject(prefix + key, value, "must be a finite number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        reject(prefix + key, value, f"expected {'an integer' if kind is int else 'a number'}")
    if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
        reject(prefix + key, value, f"must be {'>' if exclusive_min else '>='} {minimum}")
    if maximum is not None and value > maximum:
        reject(prefix + key, value, f"must be <= {maximum}")
    return kind(value)


# ----------------------------------------------------------------------------- the error path
DEBUG_ENV = "BYOL_DEBUG"


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line; for an error a data-loader worker re-raised with its
    whole traceback in the message, the last line of that traceback without the type."""
    text = str(error).strip() or type(error).__name__
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        head, sep, rest = last.partition(": ")
        text = rest if sep and head.split(".")[-1].endswith(("Error", "Exception")) else last
    return " ".join(text.split())


def run_command(body, argv=None) -> int:
    """Runs a command's ``body(argv)`` with the one error path every command shares: an expected
    failure (:class:`CommandError`, a missing file, a refused path) prints ``error: <message>`` on one
    line and returns its exit code (2 for bad input), with no traceback. ``--debug`` anywhere in
    ``argv`` (it is removed) or ``BYOL_DEBUG=1`` lets the exception through with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    expected = (CommandError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
                FileExistsError)
    try:
        return body(argv)
    except expected as error:
        if debug:
            raise
        if not getattr(error, "quiet", False):
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return getattr(error, "exit_code", 2)


# ----------------------------------------------------------------------------- output paths
def check_output_file(path: Optional[str], option: str) -> None:
    """Before any work: ``path`` can be written as a file (its folder exists or can be made, and is
    writable; ``path`` is not a folder). The folder is created."""
    if not path:
        return
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise InputError(f"{option} {path!r} is a directory: give a file path, e.g. {os.path.join(path, 'out')}")
    _make_writable_folder(os.path.dirname(path), option, path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"{option} {path!r} exists and is not writable: choose another file")


def check_output_dir(path: Optional[str], option: str) -> None:
    """Before any work: ``path`` is (or can be made) a writable folder; it is created."""
    if path:
        _make_writable_folder(os.path.abspath(path), option, os.path.abspath(path))


def _make_writable_folder(folder: str, option: str, path: str) -> None:
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{option} {path!r} cannot be written: {existing!r} is a file, not a folder; "
                         f"choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path!r} cannot be written: the folder {existing!r} is not writable; "
                         f"choose another path")
    os.makedirs(folder, exist_ok=True)
