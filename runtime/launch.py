"""The command line of ``model_def.py``: runs the BYOL trial through Determined's Trainer API.

Off a cluster it reads the ``hyperparameters`` and ``data`` sections of the given yaml and runs the
Trainer in local mode (one process, or several under ``torchrun`` with ``USE_TORCH_DISTRIBUTED=1``).
On a cluster (launched by the experiment's entrypoint) it takes the hyperparameters, the experiment
config and the latest checkpoint from the master, and refuses local-only flags (``--set``,
``--epochs``...) with a pointer to ``det experiment create --config hyperparameters.KEY=VALUE``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, Optional

import determined as det
import torch
from determined import core, pytorch

from runtime import checkpoints, cli, faults, feature_probes, performance, plots, stops
from runtime.faults import CheckpointWrites, RunFailed
from runtime.settings import (
    Length,
    Settings,
    TrainingMode,
    apply_overrides,
    load_config,
    local_values,
    mode_notes,
    parse_settings,
    slots_of,
)
from utils import (
    ConfigError,
    check_output_dir,
    check_output_file,
    check_outputs_not_inputs,
    env_flag,
    env_int,
    inputs_of_config,
    run_command,
    write_json_atomically,
)


def parse_args(argv=None) -> argparse.Namespace:
    """``model_def.py``'s arguments (the parser lives in ``runtime/cli.py``, which loads nothing heavy)."""
    return cli.parse_model_def_args(argv)


def overridden(config: Dict[str, Any], args: argparse.Namespace) -> tuple[Dict[str, Any], Dict[str, Any]]:
    """Copies of the config's hyperparameters and data section with the command line applied."""
    hparams = json.loads(json.dumps(config["hyperparameters"]))  # deep copies
    data_section = json.loads(json.dumps(config.get("data") or {}))
    if args.epochs is not None:
        hparams["train_length"] = {"epochs": args.epochs}
    if args.batches is not None:
        hparams["train_length"] = {"batches": args.batches}
    apply_overrides(hparams, data_section, args.set)
    return local_values(hparams), data_section


def distributed_context() -> Optional[core.DistributedContext]:
    """torch.distributed from torchrun's environment, gloo on CPU and nccl on GPU."""
    if env_int("WORLD_SIZE", 1, minimum=1) <= 1:
        return None
    if not env_flag("USE_TORCH_DISTRIBUTED"):
        raise ConfigError("several processes were started (WORLD_SIZE > 1) but USE_TORCH_DISTRIBUTED is not set: "
                          "run USE_TORCH_DISTRIBUTED=1 torchrun --nproc_per_node N model_def.py ...")
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # A frozen peer ends the run after this long, naming its rank (faults.py), instead of a hang.
        torch.distributed.init_process_group(backend=backend,
                                             timeout=datetime.timedelta(seconds=faults.collective_timeout()))
    single_node = os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
    if not single_node or "INTER_TRAIN_PROCESS_COMM_PORT_1" in os.environ:
        return core.DistributedContext.from_torch_distributed()
    # Determined's own messaging listens on fixed ports (12360 and up) by default, so two local
    # multi-process runs on one machine would collide ("Address already in use"): take free ones.
    ports = free_ports(2) if torch.distributed.get_rank() == 0 else [None, None]
    torch.distributed.broadcast_object_list(ports, src=0)
    return core.DistributedContext(
        rank=int(os.environ["RANK"]), size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]), local_size=int(os.environ["LOCAL_WORLD_SIZE"]),
        cross_rank=int(os.environ["GROUP_RANK"]), cross_size=int(os.environ["GROUP_WORLD_SIZE"]),
        pub_port=ports[0], pull_port=ports[1])


def choose_threads(settings: Settings, distributed: Optional[core.DistributedContext]) -> Settings:
    """Intra-op threads and data-loader workers that fit the cores (``performance.choose_threads``),
    applied to this process and said on rank 0. The workers only change speed, never the data:
    every sample's randomness is seeded by its index (sampling.py)."""
    processes = distributed.local_size if distributed else 1
    choice = performance.choose_threads(settings.data.num_workers, processes)
    torch.set_num_threads(choice.threads)
    if distributed is None or distributed.get_rank() == 0:
        print(choice.describe(), flush=True)
    if choice.workers == settings.data.num_workers:
        return settings
    return dataclasses.replace(settings, data=dataclasses.replace(settings.data, num_workers=choice.workers))


def free_ports(count: int) -> list:
    """``count`` distinct TCP ports that are free right now (all probed at once, so distinct)."""
    import socket

    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


@contextlib.contextmanager
def local_trial_context(hparams: Dict, exp_conf: Dict, distributed: Optional[core.DistributedContext],
                        checkpoint_dir: Optional[str], writes: Optional["CheckpointWrites"] = None,
                        tensorboard_dir: Optional[str] = None) -> Iterator[pytorch.PyTorchTrialContext]:
    """``determined.pytorch.init`` for local mode, plus a checkpoint directory of our choice
    (``pytorch.init`` has no ``checkpoint_storage`` argument; ``core.init`` has) and the TensorBoard
    folder (``tensorboard_dir``; without it torch's SummaryWriter writes to ``./runs/``). Off a
    cluster ``core.init`` is ``core._dummy_init`` without the TensorBoard path, so that is called."""
    import pathlib

    with core._dummy_init(distributed=distributed, checkpoint_storage=checkpoint_dir,
                          tensorboard_path=pathlib.Path(tensorboard_dir) if tensorboard_dir else None,
                          preempt_mode=core.PreemptMode.WorkersAskChief) as core_context:
        if writes is not None:
            core_context.checkpoint.store_path = writes.watch(core_context.checkpoint.store_path)
        yield pytorch.PyTorchTrialContext(
            core_context=core_context, trial_seed=None, hparams=hparams,
            slots_per_trial=core_context.distributed.get_size(), num_gpus=torch.cuda.device_count(),
            exp_conf=exp_conf, aggregation_frequency=1, steps_completed=0, managed_training=True,
            debug_enabled=False, enable_tensorboard_logging=True)


def default_checkpoint_dir(config: Dict[str, Any]) -> Optional[str]:
    storage = config.get("checkpoint_storage") or {}
    if storage.get("type") == "shared_fs" and storage.get("host_path"):
        path = os.path.join(storage["host_path"], storage.get("storage_path", "") or "")
        return path
    return None


def periods(settings: Settings, steps_per_epoch: int):
    def unit(length: Optional[Length]):
        if length is None:
            return None
        return pytorch.Batch(length.to_batches(steps_per_epoch))

    return unit(settings.validation_period), unit(settings.checkpoint_period)


def run_trial(make_trial: Callable, context: pytorch.PyTorchTrialContext, settings: Optional[Settings],
              latest_checkpoint: Optional[str], checkpoint_policy: Optional[str] = None):
    """Trains the trial. ``checkpoint_policy`` (Determined's 'all' | 'none'; default: 'all' when
    pretraining, 'none' for heads and fine-tuning, which validate every epoch and need only the
    periodic and final checkpoints)."""
    trial = make_trial(context, settings)
    s = trial.settings
    validation_period, checkpoint_period = periods(s, trial.steps_per_epoch)
    if context.distributed.rank == 0:
        print(f"[byol] {s.training_mode.value} on {s.data.dataset} with {s.backbone}: {trial.total_steps} steps "
              f"({trial.steps_per_epoch} per epoch), global batch "
              f"{trial.global_batch_size}, "
              f"{context.distributed.size} process(es), device {trial.device}", flush=True)
        if context.distributed.size > 1:
            per_slot = trial.global_batch_size // context.distributed.size
            print(f"[byol] {per_slot} images per process; batch norm "
                  f"{'synchronised across' if trial.synced_batch_norm else 'per process (not synchronised) in'} "
                  f"{context.distributed.size} processes", flush=True)
        for note in mode_notes(context.get_hparams(), s):  # given settings this mode does not use
            print(f"[byol] {note}", flush=True)
    if latest_checkpoint and os.path.isdir(latest_checkpoint):  # local resume: same settings, work left
        note = checkpoints.check_resume(latest_checkpoint, s, trial.total_steps, trial.pretraining,
                                        context.distributed.size)
        if note and context.distributed.rank == 0:
            print(f"[byol] {note}", flush=True)
    trainer = pytorch.Trainer(trial, context)
    trainer.fit(max_length=pytorch.Batch(max(trial.total_steps, 0)), validation_period=validation_period,
                checkpoint_period=checkpoint_period, latest_checkpoint=latest_checkpoint,
                reporting_period=stops.StopAwareBatch(max(trial.steps_per_epoch, 1), context),
                checkpoint_policy=checkpoint_policy or ("all" if trial.pretraining else "none"))
    return trial


def final_metrics(trial, started: float, training_seconds: Optional[float] = None) -> Dict[str, Any]:
    """The run's final metrics: the last validation's, the last training period's (``final_loss``,
    ``online_classifier_accuracy``), the step reached, the times, the last checkpoint (id and path)
    and the resolved settings (``config``); after pretraining with ``compare_random_init``, first the
    comparison of the BYOL encoder with a random one and raw pixels, which trains feature probes
    (every rank takes part). ``wall_seconds`` is the whole command, from ``started``
    (:func:`process_started`) to the final metrics; ``training_seconds`` the Trainer's part of it
    (training and validations)."""
    metrics = {key: value for key, value in trial.evaluation.last_validation.items()
               if isinstance(value, (int, float))}
    history = getattr(trial, "metrics_history", None)
    training = history.last_training() if history is not None else {}
    if "loss" in training:
        metrics["final_loss"] = training["loss"]
    if "online_classifier_accuracy" in training:  # the reference's online classifier (byol.py), pretraining
        metrics["online_classifier_accuracy"] = training["online_classifier_accuracy"]
    if trial.pretraining and trial.settings.compare_random_init:
        comparing = time.time()
        comparison = trial.evaluation.compare_representations()  # BYOL vs random init vs pixels, one fair probe
        if comparison:
            metrics["representation_probe"] = comparison
            metrics["representation_probe_seconds"] = round(time.time() - comparing, 1)
    if training_seconds is not None:
        metrics["training_seconds"] = round(training_seconds, 1)
    path = trial.last_checkpoint_path
    metrics.update({"global_step": trial.global_step, "wall_seconds": round(time.time() - started, 1),
                    "last_checkpoint": trial.last_checkpoint,
                    "checkpoint_path": os.path.abspath(path) if path else None,
                    "config": {"hyperparameters": trial.settings.as_hparams()}})
    return metrics


def process_started() -> float:
    """When this process started (epoch seconds): the wall time of a command includes its imports."""
    import psutil  # a dependency of determined; only here, for the start time of the process

    return psutil.Process().create_time()


def main(argv, make_trial: Callable) -> int:
    """The command line of the entry file (``model_def.main``): ``make_trial(context, settings)``
    builds its trial (passed down, so this package never imports the entry file)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # One error path (utils.run_command): 'error: ...' on one line, exit 2 for bad input.
    return run_command(lambda args: _main(args, make_trial), argv)


# Whoever created the process group (distributed_context, Determined's pytorch.init), it is torn down
# before the interpreter exits (faults.py).
@faults.process_group_torn_down()
def _main(argv, make_trial: Callable) -> int:
    started = process_started()
    info = det.get_cluster_info()
    args = parse_args(argv)
    if info is not None and info.task_type == "TRIAL":
        return run_on_cluster(info, args, make_trial)
    return local_main(args, started, make_trial)


def local_main(args: argparse.Namespace, started: float, make_trial: Callable) -> int:
    """The local run: every input checked (config, outputs, resume checkpoint) before any work."""
    config = load_config(args.config)
    hparams, data_section = overridden(config, args)
    config = {**config, "hyperparameters": hparams, "data": data_section}
    distributed = distributed_context()
    slots = distributed.get_size() if distributed else 1
    if slots_of(config) != slots and slots > 1 and distributed.get_rank() == 0:
        print(f"[byol] note: the config asks for {slots_of(config)} slots; running {slots} local processes",
              flush=True)
    settings = parse_settings(hparams, data_section, slots)
    # An alias (latest, step-NNNNNN) is resolved once: the run continues from that UUID folder even
    # when the alias moves on to the checkpoints this run writes.
    latest = os.path.realpath(args.resume_from) if args.resume_from else None
    if latest:  # only a completely written, unchanged checkpoint (checkpoints.py)
        checkpoints.verify_checkpoint(latest, "--resume-from")
    if settings.pretrained_checkpoint:  # locally a directory (no cluster to fetch a storage id from)
        checkpoints.verify_checkpoint(settings.pretrained_checkpoint, "hyperparameters.pretrained_checkpoint")
        checkpoints.check_pretrained_backbone(settings.pretrained_checkpoint, settings.pretrained_checkpoint,
                                              settings.backbone)
    output_dir, checkpoint_dir, metrics_out = output_paths(args, config, latest)
    check_outputs({"--checkpoint-dir": checkpoint_dir, "--metrics-out": metrics_out}, hparams, data_section,
                  {"the config file (--config)": args.config,
                   "the checkpoint resumed (--resume-from)": args.resume_from})
    check_output_dir(checkpoint_dir, "--checkpoint-dir")
    check_not_copied_into_itself(checkpoint_dir)
    check_output_file(metrics_out, "--metrics-out")  # before training, not after it
    settings = choose_threads(settings, distributed)
    writes = CheckpointWrites(latest, distributed.get_rank() if distributed else 0, slots, checkpoint_dir)
    if not distributed or distributed.get_rank() == 0:
        print(f"[byol] output folder {output_dir}: checkpoints in {checkpoint_dir}, metrics {metrics_out}, "
              f"TensorBoard {os.path.join(output_dir, TENSORBOARD_FOLDER)}", flush=True)
    with writes.explained():
        train_and_report(make_trial, config, settings, distributed, checkpoint_dir, latest, started,
                         metrics_out, writes, tensorboard_dir=os.path.join(output_dir, TENSORBOARD_FOLDER))
    return 0


TENSORBOARD_FOLDER = "tensorboard"


def output_paths(args: argparse.Namespace, config: Dict[str, Any], resumed: Optional[str]) -> tuple[str, str, str]:
    """``(output folder, checkpoint storage, metrics file)`` of a local run, absolute: ``--output-dir``;
    else the folder above ``--checkpoint-dir``; else, resuming, the resumed run's folder
    (``checkpoints.run_folder``) and storage; else ``outputs/<config file name>``."""
    storage = args.checkpoint_dir or default_checkpoint_dir(config)
    if args.output_dir:
        output_dir = args.output_dir
    elif args.checkpoint_dir:
        output_dir = os.path.dirname(os.path.abspath(args.checkpoint_dir))
    elif resumed:
        output_dir = checkpoints.run_folder(resumed)
        storage = storage or os.path.dirname(resumed)
    else:
        output_dir = os.path.join("outputs", os.path.splitext(os.path.basename(args.config))[0])
    output_dir = os.path.abspath(output_dir)
    checkpoint_dir = os.path.abspath(storage or os.path.join(output_dir, "checkpoints"))
    return output_dir, checkpoint_dir, os.path.abspath(args.metrics_out or os.path.join(output_dir, "metrics.json"))


# Flags that change the run locally; on a cluster only the master's experiment config counts.
LOCAL_ONLY_FLAGS = (("epochs", "--epochs"), ("batches", "--batches"), ("set", "--set"),
                    ("checkpoint_dir", "--checkpoint-dir"), ("resume_from", "--resume-from"),
                    ("metrics_out", "--metrics-out"))


def cluster_flag_error(args: argparse.Namespace) -> Optional[str]:
    """The one-line refusal of local-only flags in a cluster entrypoint, or None."""
    given = [flag for name, flag in LOCAL_ONLY_FLAGS if getattr(args, name)]
    if not given:
        return None
    return (f"{', '.join(given)} in the entrypoint would be ignored on a cluster, where the master's experiment "
            f"config decides the run: remove them and use `det experiment create --config "
            f"hyperparameters.KEY=VALUE config/X.yaml .` (training length: hyperparameters.train_length; "
            f"resuming: the master's latest checkpoint)")


def run_on_cluster(info: "det.ClusterInfo", args: argparse.Namespace, make_trial: Callable) -> int:
    """The trial as the master configured it: its hyperparameters (``pytorch.init(hparams=...)``,
    as Determined's own launch does; without them the trial cannot read its settings and every
    checkpoint's load_data.json would record ``"hparams": null``), the expanded experiment config
    (``exp_conf`` and the ``data`` section come from the cluster info), and the latest checkpoint
    of pause/resume or preemption, or another trial's for a warm start."""
    problem = cluster_flag_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    with pytorch.init(hparams=info.trial.hparams) as context:
        run_trial(make_trial, context, None, info.latest_checkpoint)
    return 0


def train_and_report(make_trial: Callable, exp_conf: Dict[str, Any], settings: Settings, distributed,
                     checkpoint_dir: str,
                     latest: Optional[str], started: float, metrics_out: Optional[str] = None,
                     writes: Optional[CheckpointWrites] = None, result_line=None,
                     tensorboard_dir: Optional[str] = None) -> Dict[str, Any]:
    """Trains in local mode, then prints the summary (plus ``result_line(settings, metrics)``) and
    writes the metrics JSON and the curves' PNG beside it (rank 0). Returns the final metrics."""
    stops.REQUEST.install()  # SIGTERM / SIGINT: finish the step, checkpoint, exit (stops.py)
    stopping = False
    try:
        with local_trial_context(exp_conf["hyperparameters"], exp_conf, distributed, checkpoint_dir,
                                 writes, tensorboard_dir) as context:
            training = time.time()
            trial = run_trial(make_trial, context, settings, latest)
            requests = stops.requests_of(trial.finite_watch.stop_signals, trial.rank)
            stopping = bool(requests) and trial.global_step < trial.total_steps
            if stopping:
                raise stopped(trial, checkpoint_dir, requests)
            metrics = final_metrics(trial, started, time.time() - training)
            metrics["config"]["data"] = exp_conf.get("data") or {}
        if context.distributed.rank == 0:
            print_summary(trial, metrics)
            if result_line is not None:
                print(result_line(settings, metrics), flush=True)
            if metrics_out:  # atomically: a full disk leaves no partial file, and says where the results are
                write_json_atomically(metrics_out, metrics, "--metrics-out", results_kept(trial, checkpoint_dir))
                print(f"[byol] metrics written to {metrics_out}", flush=True)
                write_plot(trial, metrics_out)
    finally:
        stops.REQUEST.uninstall(stopped=stopping)
    return metrics


def results_kept(trial, checkpoint_dir: str) -> str:
    """Where a finished run's results still are when its metrics file cannot be written."""
    where = (f" and in the last checkpoint {os.path.join(checkpoint_dir, trial.last_checkpoint)}"
             if trial.last_checkpoint else "")
    return f"the results are in the summary printed above{where}"


def check_outputs(outputs: Dict[str, Optional[str]], hparams: Dict[str, Any], data_section: Dict[str, Any],
                  more_inputs: Dict[str, Optional[str]]) -> None:
    """Before any work: no output (``{option: path}``; the curves' PNG beside ``--metrics-out``
    too) is, or lies inside, what the run reads (``utils.check_not_input``)."""
    metrics_out = outputs.get("--metrics-out")
    if metrics_out:
        plot = plots.plot_path(metrics_out)
        if os.path.abspath(plot) == os.path.abspath(metrics_out):
            raise ConfigError(f"--metrics-out {metrics_out!r}: the training curves are drawn beside it in {plot!r}, "
                              f"the same file; give a .json path")
        outputs = {**outputs, "the curves beside --metrics-out": plot}
    inputs = inputs_of_config(hparams, data_section)
    check_outputs_not_inputs(outputs, {**inputs, **{k: v for k, v in more_inputs.items() if v}})


def stopped(trial, checkpoint_dir: str, requests: Dict[int, int]) -> RunFailed:
    """The run stopped on a signal after writing its checkpoint: which signal (and which rank got it,
    when not this one), where the checkpoint is and how to go on. ``requests``: rank -> signal."""
    path = os.path.join(checkpoint_dir, trial.last_checkpoint) if trial.last_checkpoint else None
    if path is None:
        where = "no checkpoint was written"
    else:
        again = faults.continue_command(path, trial.world_size)
        where = f"checkpoint {path}" + (f"; continue with: {again}" if again else "")
    signum = requests.get(trial.rank) or requests[min(requests)]
    name = stops.signal_name(signum)
    if trial.rank not in requests:
        ranks = sorted(requests)
        name += f" sent to rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
    failure = RunFailed(f"stopped by {name} after global step {trial.global_step} of "
                        f"{trial.total_steps}: {where}", exit_code=128 + signum)
    failure.quiet = trial.rank != 0  # rank 0 speaks for all
    return failure


def check_not_copied_into_itself(checkpoint_dir: str) -> None:
    """Local mode copies the working directory into every checkpoint (``code/``, minus what
    ``.detignore`` excludes); a checkpoint directory inside it would be copied into itself."""
    from determined.common import detignore

    cwd = os.getcwd()
    relative = os.path.relpath(checkpoint_dir, cwd)
    if relative.startswith(os.pardir) or os.path.isabs(relative):
        return
    if relative == os.curdir:
        raise ConfigError(f"checkpoint directory {checkpoint_dir!r} is the working directory: choose another one")
    ignore = detignore.make_shutil_ignore(__import__("pathlib").Path(cwd))
    parts = relative.split(os.sep)
    for depth, name in enumerate(parts):
        if name in ignore(os.path.join(cwd, *parts[:depth]), [name]):
            return
    raise ConfigError(f"checkpoint directory {checkpoint_dir!r} is inside the working directory {cwd!r}, which "
                      f"Determined copies into every checkpoint (its code/ folder): it would copy itself. Use a "
                      f"directory outside it, or one that .detignore excludes (e.g. checkpoints/)")


def write_plot(trial, metrics_out: str) -> Optional[str]:
    """Loss, learning-rate and accuracy curves next to the metrics file (``plots.py``)."""
    history = getattr(trial, "metrics_history", None)
    if history is None:
        return None
    s = trial.settings
    path = plots.write_metrics_plot(history, plots.plot_path(metrics_out), kept=f"the metrics are in {metrics_out}",
                                    title=f"{s.training_mode.value}: {s.backbone} on {s.data.dataset}")
    print(f"[byol] training curves drawn in {path}", flush=True)
    return path


def print_summary(trial, metrics: Dict[str, Any]) -> None:
    parts = [f"{label} {metrics[key]} s" for key, label in (("training_seconds", "training and validation"),
                                                             ("representation_probe_seconds", "representation "
                                                              "comparison")) if key in metrics]
    lines = [f"[byol] finished {metrics['global_step']} steps; wall time {metrics['wall_seconds']} s for the whole "
             f"command" + (f" ({', '.join(parts)}; the rest is start-up and checks)" if parts else "")]
    if "test_accuracy" in metrics:
        what = {TrainingMode.SELF_SUPERVISED: "linear probe", TrainingMode.CLASSIFIER_ONLY: "linear heads",
                TrainingMode.FINE_TUNE: "fine-tuned"}[trial.settings.training_mode]
        lines.append(f"[byol] {what}: test accuracy {metrics['test_accuracy']:.4f} "
                     f"(head lr {metrics.get('best_classifier_lr')} chosen on validation "
                     f"accuracy {metrics.get('validation_accuracy', float('nan')):.4f})")
    if "knn_accuracy" in metrics:
        lines.append(f"[byol] weighted {trial.settings.classifier.knn_k}-NN on frozen features: test accuracy "
                     f"{metrics['knn_accuracy']:.4f}")
    if "representation_probe" in metrics:
        lines.append(feature_probes.format_comparison(metrics["representation_probe"]))
    if "final_loss" in metrics:
        lines.append(f"[byol] final training loss {metrics['final_loss']:.4f}" + (
            f", online classifier accuracy {metrics['online_classifier_accuracy']:.4f} (on sg(y) of the labelled "
            f"training images)" if "online_classifier_accuracy" in metrics else "")
            + " (means over the last training period, at most an epoch)")
    if metrics.get("checkpoint_path") or metrics.get("last_checkpoint"):
        lines.append(f"[byol] last checkpoint: {metrics.get('checkpoint_path') or metrics['last_checkpoint']}")
    print("\n".join(lines), flush=True)
