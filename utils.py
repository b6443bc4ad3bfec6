"""The one error path of every command (``model_def.py``, ``evaluate_result.py``,
``generate_blob_list.py``): the errors a user can fix, printed as ``error: <message>`` on one line
(:func:`run_command`), and the output-path checks made before any work starts."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import tempfile
from typing import Any, Callable, Optional


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
    ``argv`` (it is removed) or ``BYOL_DEBUG=1`` (or true/yes) lets the exception through with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    expected = (CommandError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
                FileExistsError)
    try:
        debug = env_flag(DEBUG_ENV) or debug  # BYOL_DEBUG=no means no; a word that is neither is refused
        check_environment()  # every variable the project reads, before any work
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
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:  # read-only file system, a name too long, ...: one line, not a raw [Errno N]
        raise InputError(f"{option} {path!r} cannot be created: {error.strerror or error}"
                         + (f" ({error.filename!r})" if error.filename and error.filename != folder else "")
                         + "; choose another path") from None


# ----------------------------------------------------------------------------- inputs a command must never overwrite
def resolved(path: str) -> str:
    """``path`` with ``~``, ``..`` and every symbolic link resolved (also for a path not there yet)."""
    return os.path.realpath(os.path.expanduser(path))


def check_not_input(path: Optional[str], option: str, inputs: dict) -> None:
    """Refuses an output ``path`` that is, or lies inside, one of ``inputs`` (``{what: path}``: the
    config file, the checkpoint read, the features file, the data root, ...), compared after
    resolving symbolic links and ``..`` (and as the same file, for hard links). Writing there would
    destroy what the command reads."""
    if not path:
        return
    target = resolved(path)
    for what, source in inputs.items():
        if not source or not isinstance(source, str) or source.startswith("gs://"):
            continue
        origin = resolved(source)
        same = target == origin or (os.path.exists(target) and os.path.exists(origin)
                                    and os.path.samefile(target, origin))
        inside = os.path.isdir(origin) and target.startswith(origin.rstrip(os.sep) + os.sep)
        if same or inside:
            where = "is" if same else "lies inside"
            raise InputError(f"{option} {path!r} {where} {what} {source!r}, which this command reads: writing it "
                             f"would destroy that input; choose an output path outside it")


def inputs_of_config(hyperparameters: dict, data_section: Optional[dict], config_path: Optional[str] = None) -> dict:
    """The local files and folders a run's configuration reads (``{what: path}``), for
    :func:`check_not_input`."""
    hyperparameters = hyperparameters if isinstance(hyperparameters, dict) else {}
    data_section = data_section if isinstance(data_section, dict) else {}
    classifier = hyperparameters.get("classifier") if isinstance(hyperparameters.get("classifier"), dict) else {}
    gcs = data_section.get("gcs") if isinstance(data_section.get("gcs"), dict) else {}
    found = {"the config file": config_path,
             "hyperparameters.backbone_weights": hyperparameters.get("backbone_weights"),
             "hyperparameters.pretrained_checkpoint": hyperparameters.get("pretrained_checkpoint"),
             "hyperparameters.classifier.label_list": classifier.get("label_list"),
             # digits is bundled with scikit-learn: its root is not read
             "data.root": data_section.get("root") if data_section.get("dataset", "digits") != "digits" else None,
             "data.gcs.train_blob_list": gcs.get("train_blob_list"),
             "data.gcs.val_blob_list": gcs.get("val_blob_list")}
    return {what: path for what, path in found.items() if isinstance(path, str) and path}


# ----------------------------------------------------------------------------- writing outputs
class OutputWriteError(CommandError):
    """An output file could not be written (full disk, lost permission); nothing partial is left."""


@contextlib.contextmanager
def atomic_output(path: str, what: str, kept: str = ""):
    """Yields a binary handle on a temporary file beside ``path``; on success it is flushed, synced
    and renamed over ``path`` (``os.replace``), so ``path`` is either the old file, or absent, or
    the whole new one. A failure (full disk) removes the temporary file and ends with one line
    naming ``what`` and where the results still are (``kept``)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    temporary = None
    try:
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".part")
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644 & ~_umask())
        os.replace(temporary, path)
        temporary = None
        _fsync_folder(directory)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputWriteError(f"cannot write {what} {path!r}: {reason}; nothing partial was left there"
                               + (f"; {kept}" if kept else "")) from error
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def write_bytes_atomically(path: str, data: bytes, what: str = "file", kept: str = "") -> None:
    """``data`` to ``path`` through :func:`atomic_output`."""
    with atomic_output(path, what, kept) as stream:
        stream.write(data)


def write_json_atomically(path: str, value: Any, what: str = "file", kept: str = "") -> None:
    """``value`` as indented, key-sorted JSON to ``path`` through :func:`atomic_output`."""
    import json

    with atomic_output(path, what, kept) as stream:
        stream.write(json.dumps(value, indent=2, sort_keys=True).encode("utf-8"))


def check_outputs_not_inputs(outputs: dict, inputs: dict) -> None:
    """:func:`check_not_input` for each ``{option: path}`` of ``outputs``."""
    for option, path in outputs.items():
        check_not_input(path, option, inputs)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_folder(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- environment variables
# Every variable the project reads, checked before any work (run_command): a bad value is one line
# naming the variable, never ignored while the output says "as set".
FLAG_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
              "off": False, "": False}


def env_flag(name: str, environment: Optional[dict] = None) -> bool:
    """A yes/no variable: 1/0, true/false, yes/no, on/off (any case; unset or empty: no)."""
    environment = os.environ if environment is None else environment
    text = environment.get(name, "")
    value = FLAG_WORDS.get(text.strip().lower())
    if value is None:
        raise InputError(f"environment variable {name}={text!r}: expected 1 or 0 (true/false, yes/no)")
    return value


def _env_number(name: str, default, environment: Optional[dict], parse: Callable, valid: Callable, expected: str):
    """The variable ``name`` parsed by ``parse`` (unset or empty: ``default``), refused in one line
    naming it and ``expected`` unless ``valid(value)``."""
    environment = os.environ if environment is None else environment
    text = environment.get(name, "")
    if not text.strip():
        return default
    try:
        value = parse(text.strip())
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise InputError(f"environment variable {name}={text!r}: expected {expected}")
    return value


def env_int(name: str, default: Optional[int] = None, minimum: int = 0, environment: Optional[dict] = None
            ) -> Optional[int]:
    """A whole-number variable (unset or empty: ``default``), at least ``minimum``."""
    return _env_number(name, default, environment, int, lambda value: value >= minimum,
                       f"a whole number >= {minimum}")


def env_seconds(name: str, default: Optional[float] = None, environment: Optional[dict] = None
                ) -> Optional[float]:
    """A positive, finite number of seconds (unset or empty: ``default``)."""
    return _env_number(name, default, environment, float, lambda value: math.isfinite(value) and value > 0,
                       "seconds > 0" + (f" (default {default:g})" if default is not None else ""))


def env_url(name: str, environment: Optional[dict] = None) -> Optional[str]:
    """An http(s)://host:port URL (unset or empty: None)."""
    from urllib.parse import urlsplit

    environment = os.environ if environment is None else environment
    text = environment.get(name, "")
    if not text.strip():
        return None
    try:
        parts = urlsplit(text.strip())
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise InputError(f"environment variable {name}={text!r} is not a URL: expected http://host:port "
                         f"(e.g. http://127.0.0.1:9023 for a local storage emulator)")
    return text.strip()


def check_environment(environment: Optional[dict] = None) -> None:
    """Checks every environment variable the project reads (one clear line for a bad one)."""
    environment = os.environ if environment is None else environment
    env_flag(DEBUG_ENV, environment)
    env_flag("USE_TORCH_DISTRIBUTED", environment)
    env_seconds("BYOL_COLLECTIVE_TIMEOUT", environment=environment)
    env_int("OMP_NUM_THREADS", minimum=1, environment=environment)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        env_int(name, minimum=1, environment=environment)
    world = env_int("WORLD_SIZE", 1, minimum=1, environment=environment)
    local_world = env_int("LOCAL_WORLD_SIZE", world, minimum=1, environment=environment)
    for name, size, bound in (("RANK", "WORLD_SIZE", world), ("LOCAL_RANK", "LOCAL_WORLD_SIZE", local_world),
                              ("GROUP_RANK", None, None)):
        value = env_int(name, minimum=0, environment=environment)
        if value is not None and bound is not None and value >= bound:
            raise InputError(f"environment variable {name}={value} is not below {size}={bound}: start several "
                             f"processes with torchrun, which sets both")
    env_url("STORAGE_EMULATOR_HOST", environment)
