"""Faults that end a run, turned into one clear message each.

Long BYOL runs (the paper's 1000 epochs, section 3.3) meet broken inputs and broken machines. This
module names them:

* :class:`UnreadableImageError`: an image file that cannot be decoded (truncated download, not an
  image at all). :class:`ReadGuard` wraps a dataset; on a failed read it finds the sample and names
  its file, through the wrappers the trial stacks on top of the image folders.
* :class:`CheckpointWrites`: removes a checkpoint whose writing failed and turns the faults that end
  a run into :class:`RunFailed`, one message naming the last complete checkpoint and the command
  that continues from it.
* The process group of several processes: a frozen peer (collective timeout), a lost one (its
  process ended: killed or crashed), and the group's teardown at the end of every run
  (:func:`process_group_torn_down`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shlex
import shutil
import sys
import time
from typing import Any, Iterator, List, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from runtime import checkpoints, nonfinite, replicas
from runtime.gcs_client import GCSError
from utils import CommandError, env_seconds, one_line


class UnreadableImageError(RuntimeError):
    """An image of the dataset could not be read or decoded."""


# What PIL raises for undecodable files: OSError ("image file is truncated", UnidentifiedImageError),
# SyntaxError ("broken PNG file"), EOFError, DecompressionBombError (an image too large to be safe);
# missing or unreadable files are OSErrors too.
_READ_ERRORS = (OSError, SyntaxError, EOFError, Image.DecompressionBombError)


def _source_of(dataset: Any, index: int) -> Optional[str]:
    """The file (or object name) behind sample ``index``, looking through dataset wrappers."""
    for _ in range(16):  # wrappers nest a few levels deep
        if isinstance(dataset, Subset):
            dataset, index = dataset.dataset, int(dataset.indices[index])
        elif isinstance(dataset, ConcatDataset):
            import bisect

            which = bisect.bisect_right(dataset.cumulative_sizes, index)
            index -= dataset.cumulative_sizes[which - 1] if which else 0
            dataset = dataset.datasets[which]
        elif hasattr(dataset, "samples") and isinstance(dataset.samples, (list, tuple)):
            sample = dataset.samples[index]
            return str(sample[0] if isinstance(sample, (tuple, list)) else sample)
        elif hasattr(dataset, "base"):
            dataset = dataset.base
        elif hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        else:
            return None
    return None


def _index_of(key: Any) -> int:
    return int(key[0]) if isinstance(key, (tuple, list)) else int(key)


class ReadGuard(Dataset):
    """``dataset`` unchanged, except that a failed read raises :class:`UnreadableImageError`
    naming the file. Costs nothing while reads succeed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _error(self, key: Any, error: BaseException) -> UnreadableImageError:
        index = _index_of(key)
        source = _source_of(self.dataset, index)
        where = f"image file {source!r}" if source else f"sample {index} of the dataset"
        return UnreadableImageError(f"cannot read {where}: {type(error).__name__}: {error}. Replace or remove "
                                    f"the file (a truncated download or not an image)")

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except _READ_ERRORS as error:
            raise self._error(key, error) from error

    def __getitems__(self, keys: Sequence):
        fetch = getattr(self.dataset, "__getitems__", None)
        try:
            return fetch(list(keys)) if fetch else [self.dataset[key] for key in keys]
        except _READ_ERRORS:
            for key in keys:  # which sample was it?
                try:
                    self.dataset[key]
                except _READ_ERRORS as single:
                    raise self._error(key, single) from single
            raise


# ----------------------------------------------------------------------------- the process group
COLLECTIVE_TIMEOUT_ENV = "BYOL_COLLECTIVE_TIMEOUT"
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0  # a healthy step, checkpoint or validation wait is far shorter


def collective_timeout() -> float:
    """Seconds a collective may wait for the other processes (``BYOL_COLLECTIVE_TIMEOUT``)."""
    return env_seconds(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S)


def is_collective_timeout(error: BaseException) -> bool:
    """A collective that waited too long, or one that failed because an earlier one did (gloo then
    says "Application timeout caused pair closure")."""
    text = str(error).lower()
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and ("timed out" in text or "timeout" in text))


# What gloo says when a peer's process ended mid-collective (its sockets closed by the kernel).
_LOST_PEER_TEXTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "ECONNRESET", "EPIPE")


def is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another process of the run ended (gloo
    raises RuntimeError; a BrokenPipeError of this process's own output is not one)."""
    text = str(error)
    return (isinstance(error, RuntimeError) and torch.distributed.is_available()
            and torch.distributed.is_initialized() and any(needle in text for needle in _LOST_PEER_TEXTS))


def unanswered_ranks(wait_s: float = 5.0) -> Optional[List[int]]:
    """After a collective failed: the ranks that did not answer, or None when the store that takes
    the answers is gone too (it lived in the lost process). Every process whose collective failed
    is alive and marks itself in the process group's store; the ranks with no mark within
    ``wait_s`` seconds are gone, frozen, stopped or stuck elsewhere. (gloo's messages name no peer,
    hence this roll call.)"""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        store.set(f"byol/alive/{rank}", "1")
        deadline = time.monotonic() + wait_s
        missing = [r for r in range(size) if r != rank]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"byol/alive/{r}"])]
            time.sleep(0.2)
        return missing
    except (RuntimeError, OSError):  # torch.distributed.DistError is a RuntimeError
        return None


def end_process_group(synchronise: bool = True) -> None:
    """Tears torch.distributed's default process group down, if there is one: after a barrier when
    every process gets here (``synchronise``), at once otherwise (a peer may be gone).

    Neither torchrun nor Determined's harness does it, and a group left to the interpreter's exit
    aborts the process now and then: gloo's worker threads release the last collective's tensors,
    a release that needs the GIL, while the main thread finalises the interpreter; Python ends a
    thread that asks for the GIL then (``pthread_exit``), whose unwinding through a C++ destructor
    calls ``std::terminate``: "terminate called without an active exception", SIGABRT, after the
    work was done (about one two-process run in six on a 2-core machine). Destroying the group joins
    those threads while the interpreter is whole."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronise:
        try:
            dist.barrier()
        except RuntimeError:  # a peer ended meanwhile: nothing left to wait for
            pass
    dist.destroy_process_group()


@contextlib.contextmanager
def process_group_torn_down() -> Iterator[None]:
    """Runs the block, then :func:`end_process_group`: synchronised when the block ended normally or
    on a stop on request (every process stops at the same step), at once after a fault."""
    try:
        yield
    except BaseException as error:
        end_process_group(synchronise=getattr(error, "exit_code", 0) >= 128)
        raise
    end_process_group(synchronise=True)


def interpreter() -> str:
    """This Python (``sys.executable``, e.g. the venv's), relative to the working directory when
    inside it (``.venv/bin/python``), for commands a person copies."""
    relative = os.path.relpath(sys.executable)
    return relative if not relative.startswith(os.pardir) else sys.executable


def continue_command(checkpoint: str, world_size: int) -> Optional[str]:
    """The command that continues this run from ``checkpoint``: ``model_def.py``'s command line with
    ``--resume-from`` (replaced, if given), ``evaluate_result.py``'s with ``--resume`` (an evaluation
    continues from its own folder), under torchrun the same torchrun command with it; None for any
    other command."""
    script = os.path.basename(sys.argv[0])
    if script == "model_def.py":
        argv, skip = [], False
        for arg in sys.argv[1:]:
            if skip or arg == "--resume-from":
                skip = not skip
                continue
            if not arg.startswith("--resume-from="):
                argv.append(arg)
        flag = f"--resume-from {checkpoint}"
    elif script == "evaluate_result.py":
        argv, flag = [arg for arg in sys.argv[1:] if arg != "--resume"], "--resume"
    else:
        return None
    if world_size > 1:
        return f"the same torchrun command with {flag}"
    return f"{shlex.join([interpreter(), sys.argv[0], *argv])} {flag}"


class RunFailed(CommandError):
    """A fault that ended the run, explained in one message (printed by ``utils.run_command``)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _first_line(error: BaseException) -> str:
    """gloo's message without its source location and advice: ``Connection closed by peer [...]``."""
    text = one_line(error)
    text = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
    return text.split(". ", 1)[0]


def _unpickler_reason(error: BaseException) -> str:
    """The line of torch's long weights_only message that names what was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unpickler error" in line]
    return (named or lines or [repr(error)])[0]


FULL_DISK_BYTES = 16 << 20  # less free space than this after a failed checkpoint write: the disk is full


class CheckpointWrites:
    """The checkpoints this process writes (rank 0 writes them all), and the faults that end a run.

    :meth:`watch` wraps the core context's ``store_path``: a checkpoint whose writing fails (full
    disk, non-finite weights, ...) is removed at once, so every checkpoint directory that remains is
    a good one. :meth:`explained` turns the faults a run can meet into :class:`RunFailed` with one
    clear message that names the last complete checkpoint."""

    def __init__(self, resumed_from: Optional[str] = None, rank: int = 0, world_size: int = 1,
                 directory: Optional[str] = None):
        self.complete = [resumed_from] if resumed_from else []
        self.failed: Optional[str] = None
        self.free_bytes: Optional[int] = None  # on the checkpoint's filesystem when writing failed
        self.rank, self.world_size = rank, world_size
        # Other ranks find rank 0's checkpoints in the (shared) directory: those not there before.
        self.directory = directory
        self._before = set(os.listdir(directory)) if directory and os.path.isdir(directory) else set()

    def watch(self, store_path):
        @contextlib.contextmanager
        def watched(*args, **kwargs):
            path = None
            try:
                with store_path(*args, **kwargs) as (path, storage_id):
                    yield path, storage_id
            except BaseException:
                if path is not None and not os.path.exists(os.path.join(path, checkpoints.COMPLETE_FILE)):
                    self.failed = str(path)
                    self.free_bytes = shutil.disk_usage(os.path.dirname(str(path))).free  # before freeing it
                    shutil.rmtree(path, ignore_errors=True)
                raise
            self.complete.append(str(path))
        return watched

    def _last_path(self) -> Optional[str]:
        if self.rank == 0 or not self.directory:
            return self.complete[-1] if self.complete else None
        written = [path for _, path in checkpoints.complete_checkpoints(self.directory)
                   if os.path.basename(path) not in self._before]
        return written[-1] if written else (self.complete[-1] if self.complete else None)

    def last_complete(self) -> str:
        last = self._last_path()
        if last is None:
            if self.rank != 0 and not self.directory:
                return "rank 0 writes the checkpoints and names the last complete one"
            return "no complete checkpoint was written"
        command = continue_command(last, self.world_size)
        return f"the last complete checkpoint is {last!r} (continue with{':' if command else ''} " \
               f"{command or '--resume-from ' + last})"

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        try:
            yield
        except (checkpoints.IncompatibleCheckpointError, checkpoints.IncompleteCheckpointError) as error:
            raise RunFailed(str(error), exit_code=2) from error
        except pickle.UnpicklingError as error:  # torch.load(weights_only=True) refused the checkpoint
            loaded = self.complete[0] if self.complete else "(being loaded)"
            raise RunFailed(f"checkpoint {loaded!r} holds more than tensors and "
                            f"plain data, so it is not loaded (weights_only): {_unpickler_reason(error)}",
                            exit_code=2) from error
        except nonfinite.NonFiniteLossError as error:  # names the step and the last good checkpoint
            raise RunFailed(one_line(error)) from error
        except (checkpoints.NonFiniteWeightsError, UnreadableImageError, GCSError,
                replicas.ReplicaDivergenceError) as error:
            raise RunFailed(f"{one_line(error)} ({self._removed()}{self.last_complete()})") from error
        except Exception as error:
            if self.failed is None and is_lost_peer(error):
                raise RunFailed(f"{self._lost(unanswered_ranks(), _first_line(error))}; the run ends: "
                                f"{self.last_complete()}") from error
            if self.failed is None and is_collective_timeout(error):
                missing = unanswered_ranks()
                who = (f"rank(s) {missing} did not answer (frozen, stopped or stuck)" if missing
                       else "every rank answered the roll call afterwards (a slow step?)" if missing == []
                       else "the process group's store is gone too (its process ended)")
                raise RunFailed(f"a collective waited longer than {COLLECTIVE_TIMEOUT_ENV}={collective_timeout():g} s: "
                                f"{who}; the run ends ({self.last_complete()})") from error
            if self.failed is None:
                raise
            raise RunFailed(f"writing checkpoint {self.failed!r} failed: {one_line(error)}. "
                            f"{self._space(error)}T{self._removed()[1:]}{self.last_complete()}") from error

    def _lost(self, missing: Optional[List[int]], detail: str) -> str:
        """Which rank(s) ended mid-collective, from the roll call (None: no store left to ask)."""
        if missing:
            which = f"rank {missing[0]}" if len(missing) == 1 else f"ranks {missing}"
            return (f"{which} of {self.world_size} {'was' if len(missing) == 1 else 'were'} lost: "
                    f"{'its process' if len(missing) == 1 else 'their processes'} ended without a stop "
                    f"(killed or crashed; gloo: {detail})")
        return f"a process of the {self.world_size} of this run was lost (killed or crashed; gloo: {detail})"

    def _space(self, error: BaseException) -> str:
        """torch.save reports a full disk as e.g. 'unexpected pos 2008768 vs 2008664': say it plainly."""
        chain, full = error, False
        while chain is not None:
            full = full or (isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT))
            chain = chain.__cause__ or chain.__context__
        if full or (self.free_bytes is not None and self.free_bytes < FULL_DISK_BYTES):
            return (f"No space left on device: {self.free_bytes} bytes were free on the checkpoint filesystem; "
                    f"make room or choose another --checkpoint-dir. ")
        return ""

    def _removed(self) -> str:
        return f"the incomplete checkpoint {self.failed!r} was removed; " if self.failed else ""
