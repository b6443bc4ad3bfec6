"""Stops and lost processes with data-loader workers (issue 17, classes 1-3).

* A signal to the run's whole process group (GNU ``timeout``, ``kill -SIG -PGID``, torchrun
  forwarding its own SIGTERM to each rank's group) reaches the data-loader workers too: the run must
  still finish the step, write a checkpoint at the stop, exit ``128 + signal`` naming the checkpoint
  and the command that continues, and that command must continue bit-identically.
* One rank stopped (SIGTERM to it alone) or lost (``kill -9``): the survivor says so in one line,
  naming the last complete checkpoint and the command that continues.
* Every run tears its process group down (``faults.end_process_group``).

The signalled runs pause before a known step until the signal has arrived (:data:`PAUSED_MODEL_DEF`),
so the stop lands at the same step whatever the machine's speed; their workers are alive then.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate_result
import model_def
from run_helpers import (
    PYTHON,
    ROOT,
    assert_identical,
    at_step,
    complete,
    environment,
    load,
    torchrun,
    train,
    training_state,
    write_config,
)
from runtime import checkpoints, faults

PAUSE_AT = 3  # the signalled runs wait before this global step
LENGTH = 6    # steps of every run here (the schedules depend on it)
WORKERS = {"validation_size": 50, "num_workers": 2}

# model_def.py, paused before global step PAUSE_AT until this process was asked to stop or the test
# releases it (a file per rank). Named model_def.py, so the command it prints to continue is the real one.
PAUSED_MODEL_DEF = '''
import importlib.util, os, sys, time
sys.path.insert(0, {root!r})
spec = importlib.util.spec_from_file_location("model_def", os.path.join({root!r}, "model_def.py"))
model_def = importlib.util.module_from_spec(spec)
sys.modules["model_def"] = model_def
spec.loader.exec_module(model_def)
from runtime import stops
train_batch = model_def.TrialBase.train_batch


def paused(self, batch, epoch_idx, batch_idx):
    if self.global_step == {step}:
        print(f"[test] rank {{self.rank}} paused", flush=True)
        while not stops.REQUEST.requested and not os.path.exists(f"{release}.{{self.rank}}"):
            time.sleep(0.05)
    return train_batch(self, batch, epoch_idx, batch_idx)


model_def.TrialBase.train_batch = paused
sys.exit(model_def.main())
'''


def tiny_config(directory, **hparams) -> str:
    data = {"dataset": "digits", "root": os.path.join(str(directory), "data"), **WORKERS}
    settings = {"train_length": {"batches": LENGTH}, "checkpoint_period": None, "finite_check_period": 1, **hparams}
    return write_config(str(directory), data=data, **settings)


@functools.lru_cache(maxsize=None)
def uninterrupted(nproc: int, directory: str) -> dict:
    """The training state after LENGTH steps straight (one run per process count and session)."""
    config = tiny_config(os.path.join(directory, f"straight{nproc}"))
    ckpt = os.path.join(directory, f"straight{nproc}", "ck")
    train(["--config", config, "--checkpoint-dir", ckpt], nproc)
    return training_state(load(at_step(ckpt, LENGTH)))


@pytest.fixture(scope="module")
def straight_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("straight"))


def paused_script(tmp_path) -> tuple:
    """``(script, release file prefix)``: :data:`PAUSED_MODEL_DEF` in its own folder; the file
    ``<prefix>.<rank>`` lets that rank go on without a signal."""
    folder = tmp_path / "paused"
    folder.mkdir()
    release = tmp_path / "release"
    script = folder / "model_def.py"
    script.write_text(PAUSED_MODEL_DEF.format(root=ROOT, step=PAUSE_AT, release=str(release)))
    return str(script), release


def start(argv, tmp_path, nproc):
    out, err = open(tmp_path / "out.log", "w"), open(tmp_path / "err.log", "w")
    return subprocess.Popen(argv, cwd=ROOT, env=environment(nproc), stdout=out, stderr=err, start_new_session=True)


def wait_for(process, path, needles, timeout=240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text()
        if all(needle in text for needle in needles):
            return
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} before {needles}: {text[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {needles} after {timeout} s")


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> dict:
    """pid -> parent pid of every process below ``pid``."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(entry)] = _parent(int(entry))
        except OSError:
            continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = ppid
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def finish(process, timeout=150) -> None:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def continued(line: str, nproc: int) -> list:
    """The command the stop line says continues the run, as argv."""
    command = line.split("continue with: ", 1)[1]
    if nproc > 1:
        prefix = "the same torchrun command with "
        assert command.startswith(prefix), line
        return None  # the caller knows its torchrun command
    argv = shlex.split(command)
    assert os.path.basename(argv[0]).startswith("python") and argv[1].endswith("model_def.py"), line
    return [PYTHON, *argv[1:]]


def check_stop(tmp_path, process, signum, ckpt, workers) -> str:
    """The stop kept its work: exit 128 + signal, one line with the checkpoint at the stop and the
    command that continues, no traceback of ours, no worker left. Returns that line."""
    err = (tmp_path / "err.log").read_text()
    lines = error_lines(err)
    assert len(lines) == 1, err[-4000:]
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"error: stopped by {name} after global step {PAUSE_AT + 1} of {LENGTH}: "), lines
    assert "DataLoader worker" not in err and "killed by signal" not in err, err[-4000:]
    assert not re.search(rf'File "{re.escape(ROOT)}/(?!\.venv/)', err), err[-4000:]
    found = complete(str(ckpt))
    assert [step for step, _ in found] == [PAUSE_AT + 1], found  # the checkpoint of the stop
    checkpoints.verify_checkpoint(found[0][1])
    assert f"checkpoint {found[0][1]}; continue with: " in lines[0] and lines[0].endswith(
        f"--resume-from {found[0][1]}"), lines[0]
    assert workers, "the run had no data-loader workers when signalled"
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers), f"data-loader workers outlived the run: {workers}"
    return lines[0]


def worker_pids(root: int, script: str) -> list:
    """The data-loader workers of a run started as ``root``: forks of a training process (the same
    command line), children of one."""
    tree = descendants(root)
    trainers = {pid for pid in [root, *tree] if script in _command_line(pid)}
    return [pid for pid, parent in tree.items() if pid in trainers and parent in trainers]


# ----------------------------------------------------------------------------- one process
@pytest.mark.slow
@pytest.mark.parametrize("how, signum", [("timeout", signal.SIGTERM), ("group", signal.SIGINT)])
def test_signal_to_the_group_with_loader_workers_stops_checkpoints_and_resumes_exactly(tmp_path, straight_dir,
                                                                                        how, signum):
    """GNU ``timeout -s TERM`` (it signals its whole process group as its time runs out; SIGALRM is
    how it learns that) and Ctrl-C-like SIGINT to the group, with 2 data-loader workers. (The
    continued run is the same whichever signal stopped it: checked once, after ``timeout``.)"""
    config = tiny_config(tmp_path)
    script, _ = paused_script(tmp_path)
    ckpt = tmp_path / "ck"
    run = [PYTHON, script, "--config", config, "--checkpoint-dir", str(ckpt)]
    if how == "timeout":
        run = ["timeout", "--preserve-status", "-s", "TERM", "900", *run]
    process = start(run, tmp_path, 1)
    try:
        wait_for(process, tmp_path / "out.log", ["[test] rank 0 paused"])
        workers = worker_pids(process.pid, script)
        if how == "timeout":
            os.kill(process.pid, signal.SIGALRM)  # timeout's time is up: it signals the group
        else:
            os.killpg(process.pid, signum)
    finally:
        finish(process)
    assert process.returncode == 128 + signum, (tmp_path / "err.log").read_text()[-3000:]
    line = check_stop(tmp_path, process, signum, ckpt, workers)
    if how != "timeout":
        return
    result = subprocess.run(continued(line, 1), cwd=ROOT, env=environment(1), capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[byol] finished {LENGTH} steps" in result.stdout
    assert_identical(training_state(load(at_step(str(ckpt), LENGTH))), uninterrupted(1, straight_dir))


# ----------------------------------------------------------------------------- two processes
def torchrun_run(script, config, ckpt, *more) -> list:
    return [*torchrun(2), script, "--config", config, "--checkpoint-dir", str(ckpt), *more]


@pytest.mark.slow
def test_sigterm_to_torchrun_with_loader_workers_stops_checkpoints_and_resumes_exactly(tmp_path, straight_dir):
    """The documented multi-process command; torchrun forwards its SIGTERM to each rank's whole
    process group, data-loader workers included."""
    config = tiny_config(tmp_path)
    script, _ = paused_script(tmp_path)
    ckpt = tmp_path / "ck"
    process = start(torchrun_run(script, config, ckpt), tmp_path, 2)
    try:
        wait_for(process, tmp_path / "out.log", ["[test] rank 0 paused", "[test] rank 1 paused"])
        workers = worker_pids(process.pid, script)
        assert len(workers) >= 4, workers  # 2 per rank
        process.send_signal(signal.SIGTERM)
    finally:
        finish(process)
    assert process.returncode != 0  # torchrun's own status after a signal (torch's launcher, not ours)
    line = check_stop(tmp_path, process, signal.SIGTERM, ckpt, workers)
    continued(line, 2)
    resumed = subprocess.run(torchrun_run(os.path.join(ROOT, "model_def.py"), config, ckpt, "--resume-from",
                                          complete(str(ckpt))[0][1]),
                             cwd=ROOT, env=environment(2), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical(training_state(load(at_step(str(ckpt), LENGTH))), uninterrupted(2, straight_dir))


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The training process of ``rank`` under torchrun (its environment has RANK=rank)."""
    for pid, parent in descendants(torchrun_pid).items():
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if parent == torchrun_pid and f"RANK={rank}".encode() in handle.read().split(b"\0"):
                    return pid
        except OSError:
            continue
    raise AssertionError(f"no process with RANK={rank} under {torchrun_pid}")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_and_rank_0_says_so(tmp_path):
    config = tiny_config(tmp_path)
    script, release = paused_script(tmp_path)
    ckpt = tmp_path / "ck"
    process = start(torchrun_run(script, config, ckpt), tmp_path, 2)
    try:
        wait_for(process, tmp_path / "out.log", ["[test] rank 0 paused", "[test] rank 1 paused"])
        os.kill(rank_pid(process.pid, 1), signal.SIGTERM)  # rank 1 goes on once it has it
        (tmp_path / "release.0").write_text("go")  # rank 0 got no signal: let it go on
    finally:
        finish(process)
    err = (tmp_path / "err.log").read_text()
    lines = error_lines(err)
    assert len(lines) == 1, err[-4000:]
    assert lines[0].startswith(f"error: stopped by SIGTERM sent to rank 1 after global step {PAUSE_AT + 1} of "
                               f"{LENGTH}: checkpoint "), lines
    found = complete(str(ckpt))
    assert [step for step, _ in found] == [PAUSE_AT + 1]
    assert lines[0].endswith(f"continue with: the same torchrun command with --resume-from {found[0][1]}")
    # both ranks exit 128 + SIGTERM (torchrun lists them)
    exits = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\n\s*exitcode\s*: (-?\d+)", err))
    assert exits == {"0": "143", "1": "143"}, err[-3000:]


@pytest.mark.slow
def test_killed_rank_is_named_with_the_last_checkpoint_and_the_command(tmp_path):
    config = tiny_config(tmp_path, checkpoint_period={"batches": 1})
    script, release = paused_script(tmp_path)
    ckpt = tmp_path / "ck"
    process = start(torchrun_run(script, config, ckpt), tmp_path, 2)
    try:
        wait_for(process, tmp_path / "out.log", ["[test] rank 0 paused", "[test] rank 1 paused"])
        victim = rank_pid(process.pid, 1)
        orphans = worker_pids(victim, script)
        os.kill(victim, signal.SIGKILL)
        while alive(victim):
            time.sleep(0.1)
        (tmp_path / "release.0").write_text("go")
    finally:
        finish(process)
    err = (tmp_path / "err.log").read_text()
    lines = error_lines(err)
    assert len(lines) == 1, err[-4000:]
    last = at_step(str(ckpt), PAUSE_AT)
    assert lines[0].startswith("error: rank 1 of 2 was lost: its process ended without a stop (killed or "
                               "crashed; gloo: "), lines
    assert lines[0].endswith(f"the last complete checkpoint is {last!r} (continue with: the same torchrun "
                             f"command with --resume-from {last})"), lines
    assert "[rank0]: Traceback" not in err, err[-4000:]
    assert [step for step, _ in complete(str(ckpt))] == [1, 2, 3]
    assert orphans and not any(alive(pid) for pid in orphans), "the killed rank's workers outlived it"


ORPHANED_WORKER = """
import multiprocessing, os, sys, time
sys.path.insert(0, {root!r})
from runtime import stops


def blocked_worker():
    stops.detach_worker()
    time.sleep(600)  # e.g. a read that never returns: torch's own orphan check would not run


child = multiprocessing.get_context("fork").Process(target=blocked_worker, daemon=True)
child.start()
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_detached_worker_leaves_the_group_and_ends_when_its_process_dies(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHANED_WORKER.format(root=ROOT))
    parent = subprocess.Popen([PYTHON, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        worker = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while os.getsid(worker) == parent.pid and time.monotonic() < deadline:  # detach_worker ran
            time.sleep(0.05)
        assert os.getsid(worker) == worker, "the worker is still in the run's session: group signals reach it"
        os.killpg(parent.pid, signal.SIGTERM)  # the group's signal: the worker is not in it
        parent.wait(timeout=30)
        assert alive(worker)
        deadline = time.monotonic() + 30  # a bound, not a timing: the guard checks once a second
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(worker), "a worker outlived its main process"
    finally:
        if parent.poll() is None:
            parent.kill()


# ----------------------------------------------------------------------------- teardown
def one_rank_group(tmp_path, name: str = "store") -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / name}", rank=0, world_size=1)


@pytest.fixture
def no_group_left():
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("command", ["model_def", "evaluate_result"])
def test_every_command_tears_its_process_group_down(no_group_left, tmp_path, command, capsys):
    """Even when it ends on an error: the group is destroyed before the command returns."""
    one_rank_group(tmp_path)
    if command == "model_def":
        code = model_def.main(["--config", str(tmp_path / "missing.yaml")])
    else:
        code = evaluate_result.main(["--checkpoint", str(tmp_path / "missing")])
    assert code == 2 and "error: " in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("exit_code, synchronised", [(None, True), (143, True), (1, False)])
def test_teardown_synchronises_when_every_rank_gets_there(no_group_left, tmp_path, monkeypatch, exit_code,
                                                          synchronised):
    """A normal end or a stop (every rank stops at the same step): barrier, then destroy; a fault
    (a peer may be gone): destroy at once."""
    barriers = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: barriers.append(1))
    one_rank_group(tmp_path)
    try:
        with faults.process_group_torn_down():
            if exit_code is not None:
                raise faults.RunFailed("ended", exit_code=exit_code)
    except faults.RunFailed:
        assert exit_code is not None
    assert barriers == ([1] if synchronised else []) and not torch.distributed.is_initialized()
    faults.end_process_group()  # no group: nothing to do


# ----------------------------------------------------------------------------- the lost rank's message
GLOO_LOST = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:5760. "
             "This is typically caused by a remote worker crashing.")


@pytest.mark.parametrize("rank", [0, 1])
def test_lost_rank_is_one_line_with_the_last_checkpoint_and_the_command(no_group_left, tmp_path, monkeypatch, rank):
    """Rank 0 knows the checkpoints it wrote; another survivor finds them in the checkpoint folder
    (those that were not there when the run started)."""
    one_rank_group(tmp_path)
    monkeypatch.setattr(faults, "unanswered_ranks", lambda: [1 - rank])
    monkeypatch.setattr(sys, "argv", [os.path.join(ROOT, "model_def.py"), "--config", "c.yaml"])
    folder = tmp_path / "ck"
    (folder / "older").mkdir(parents=True)
    (folder / "older" / checkpoints.COMPLETE_FILE).write_text(json.dumps({"global_step": 9}))
    writes = faults.CheckpointWrites(None, rank=rank, world_size=2, directory=str(folder))
    (folder / "new").mkdir()
    (folder / "new" / checkpoints.COMPLETE_FILE).write_text(json.dumps({"global_step": 3}))
    writes.complete.append(str(folder / "new"))  # as rank 0's store_path records it
    with pytest.raises(faults.RunFailed) as failure:
        with writes.explained():
            raise RuntimeError(GLOO_LOST)
    last = str(folder / "new")
    assert str(failure.value) == (
        f"rank {1 - rank} of 2 was lost: its process ended without a stop (killed or crashed; gloo: Connection "
        f"closed by peer [127.0.0.1]:5760); the run ends: the last complete checkpoint is {last!r} (continue "
        f"with: the same torchrun command with --resume-from {last})")
    assert failure.value.exit_code == 1
