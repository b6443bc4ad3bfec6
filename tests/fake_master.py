"""A stand-in for the Determined 0.38.1 master at its HTTP API, and the agent's start of a trial.

This file implements no part of the BYOL paper (Grill et al. 2020, arXiv 2006.07733); it lets the
tests run the paper's pretraining and linear evaluation (section 4, appendix C) through
Determined's real Python harness, with only the master (a Go server that cannot run here) replaced
at its narrowest seam: the REST calls. Every answer is built with Determined's own generated
``bindings`` classes, so the real client code parses it; every request is recorded.

:class:`StandInMaster` answers exactly the calls listed in :data:`ROUTES` (each with the harness or
SDK code that makes it) and fails loudly (HTTP 501, recorded in ``unanswered``) on any other.
:meth:`StandInMaster.launch` starts a trial the way a Determined agent starts a trial container:
the environment variables of the master's task spec, the container's ``/run/determined`` and the
shared_fs checkpoint mount (``/determined_shared_fs``) in a private mount namespace (``unshare``),
then the steps of the master's ``entrypoint.sh``: ``determined.exec.prep_container`` (downloads the
model definition uploaded by ``create_experiment``, reports the resources, rendezvous) and
``determined.exec.launch``, which runs the config's exact entrypoint string. The startup hook is
not sourced: it would pip-install into the shared test environment (it installs nothing new there).
"""
from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

import yaml
from determined.common.api import bindings

VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
RUN_DIR = "/run/determined"  # the harness reads its cluster info from fixed paths here (determined/_info.py)
SHARED_FS = "/determined_shared_fs"  # determined.common.constants.SHARED_FS_CONTAINER_PATH
NOW = "2026-01-01T00:00:00Z"

# (method, path regex, handler name, the Determined 0.38.1 code that makes the call)
ROUTES = [
    ("POST", r"/api/v1/auth/login", "login", "SDK login: common/api/authentication.py login() (bindings.post_Login)"),
    ("GET", r"/api/v1/me", "me", "SDK cached-token check: authentication._is_token_valid"),
    ("GET", r"/api/v1/tasks/(?P<task>[^/]+)/context_directory", "context_directory",
     "exec/prep_container.py download_context_directory (bindings.get_GetTaskContextDirectory)"),
    ("POST", r"/api/v1/allocations/(?P<alloc>[^/]+)/acceleratorData", "accelerator_data",
     "exec/prep_container.py --resources (bindings.post_PostAllocationAcceleratorData)"),
    ("GET", r"/api/v1/allocations/(?P<alloc>[^/]+)/resources/(?P<res>[^/]+)/rendezvous", "rendezvous",
     "exec/prep_container.py do_rendezvous_rm_provided (bindings.get_AllocationRendezvousInfo)"),
    ("POST", r"/api/v1/runs/start", "run_prepare",
     "core/_context.py _run_prepare (bindings.post_RunPrepareForReporting)"),
    ("POST", r"/api/v1/trials/(?P<trial>\d+)/runner/metadata", "runner_metadata",
     "core/_train.py TrainContext.set_status"),
    ("GET", r"/api/v1/trials/(?P<trial>\d+)", "get_trial",
     "core/_train.py TrainContext._get_last_validation (pytorch/_pytorch_trial.py at start)"),
    ("POST", r"/api/v1/trials/(?P<trial>\d+)/metrics", "report_metrics",
     "core/_metrics.py _MetricsContext (bindings.post_ReportTrialMetrics: training and validation)"),
    ("POST", r"/api/v1/trials/(?P<trial>\d+)/progress", "progress", "core/_train.py TrainContext.report_progress"),
    ("POST", r"/api/v1/checkpoints", "report_checkpoint",
     "core/_checkpoint.py _report_checkpoint (bindings.post_ReportCheckpoint)"),
    ("GET", r"/api/v1/checkpoints/(?P<uuid>[^/]+)", "get_checkpoint",
     "core/_checkpoint.py restore_path / download (bindings.get_GetCheckpoint); SDK client.get_checkpoint"),
    ("GET", r"/api/v1/allocations/(?P<alloc>[^/]+)/signals/preemption", "preemption",
     "core/_preempt.py _PreemptionWatcher long poll (bindings.get_AllocationPreemptionSignal)"),
    ("POST", r"/api/v1/allocations/(?P<alloc>[^/]+)/signals/ack_preemption", "ack_preemption",
     "core/_preempt.py PreemptContext.acknowledge_preemption_signal"),
    ("GET", r"/api/v1/experiments/(?P<exp>\d+)/searcher/best_searcher_validation_metric", "best_validation",
     "core/_train.py TrainContext.get_experiment_best_validation (pytorch/_pytorch_trial.py _validate)"),
    ("GET", r"/api/v1/experiments/(?P<exp>\d+)/checkpoints", "experiment_checkpoints",
     "SDK Experiment.list_checkpoints (bindings.get_GetExperimentCheckpoints)"),
    ("GET", r"/api/v1/experiments/(?P<exp>\d+)", "get_experiment",
     "SDK client.get_experiment (bindings.get_GetExperiment)"),
    ("POST", r"/api/v1/experiments", "create_experiment",
     "SDK client.create_experiment (bindings.post_CreateExperiment), as `det experiment create`"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def expand_config(config: Dict[str, Any], storage_root: str) -> Dict[str, Any]:
    """The parts of the master's expansion of a submitted config that the harness reads: shared_fs
    checkpoint storage (the agent mounts ``host_path`` at /determined_shared_fs) and the defaults
    of the sections it looks into (``debug``, ``resources``, ``max_restarts``)."""
    expanded = copy.deepcopy(config)
    expanded["checkpoint_storage"] = {"type": "shared_fs", "host_path": storage_root, "storage_path": None,
                                      "propagation": "rprivate", "save_experiment_best": 0,
                                      "save_trial_best": 1, "save_trial_latest": 1}
    expanded.setdefault("debug", False)
    expanded.setdefault("max_restarts", 5)
    expanded.setdefault("resources", {}).setdefault("slots_per_trial", 1)
    return expanded


SEARCH_TYPES = ("const", "int", "double", "log", "categorical")


def sample_hyperparameters(space: Dict[str, Any], rng: random.Random) -> Dict[str, Any]:
    """One trial's hyperparameters as the master's searcher hands them (DET_HPARAMS): each
    ``{type: ...}`` mapping of the config sampled as master/pkg/searcher/hyperparameters.go
    ``sampleOne`` does (const: ``val``; int: uniform on [minval, maxval); double: uniform on
    [minval, maxval]; log: ``base ** uniform(minval, maxval)``; categorical: one of ``vals``), a
    mapping without ``type`` as nested hyperparameters, a plain value as a constant. The values then
    pass through JSON as the Go master writes it: a float with an integral value becomes an integer
    (Go's encoding/json writes float64 1.0 as ``1``)."""

    def sample(value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") in SEARCH_TYPES:
            kind = value["type"]
            if kind == "const":
                return value["val"]
            if kind == "int":
                return value["minval"] + rng.randrange(value["maxval"] - value["minval"])
            if kind == "double":
                return rng.uniform(value["minval"], value["maxval"])
            if kind == "log":
                return value["base"] ** rng.uniform(value["minval"], value["maxval"])
            return value["vals"][rng.randrange(len(value["vals"]))]
        if isinstance(value, dict):
            return {key: sample(item) for key, item in value.items()}
        return value

    def as_go_writes_it(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {key: as_go_writes_it(item) for key, item in value.items()}
        if isinstance(value, list):
            return [as_go_writes_it(item) for item in value]
        return value

    return as_go_writes_it(sample(copy.deepcopy(space)))


def files_to_tgz(files: List[Dict[str, Any]]) -> bytes:
    """The uploaded model definition (v1File list from ``determined.common.context``) as the tgz
    that GetTaskContextDirectory returns."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for item in files:
            info = tarfile.TarInfo(item["path"])
            info.type = bytes([item["type"]])
            info.mode, info.mtime = item["mode"] & 0o7777, int(item["mtime"])
            content = base64.b64decode(item.get("content") or "")
            if info.type == tarfile.REGTYPE:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
            else:
                archive.addfile(info)
    return out.getvalue()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A trial process that exits while its preemption long poll is open resets the connection.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class Trial:
    def __init__(self, trial_id: int, experiment_id: int, hparams: Dict[str, Any]):
        self.id, self.experiment_id, self.hparams = trial_id, experiment_id, hparams
        self.run_id = 0
        self.state = "ACTIVE"
        self.exit_codes: List[int] = []
        self.logs: List[str] = []


class StandInMaster:
    """A threaded HTTP server on 127.0.0.1 answering :data:`ROUTES`; see the module docstring."""

    def __init__(self, storage_root: str):
        self.storage_root = storage_root
        self.lock = threading.Lock()
        self.experiments: Dict[int, Dict[str, Any]] = {}
        self.trials: Dict[int, Trial] = {}
        self.checkpoints: Dict[str, Dict[str, Any]] = {}  # uuid -> v1Checkpoint JSON as reported
        self.metrics: List[Dict[str, Any]] = []  # every ReportTrialMetrics body, with its group
        self.requests: List[tuple] = []  # (method, path) of every request
        self.unanswered: List[tuple] = []
        self.errors: List[str] = []  # handler failures (bugs of the stand-in)
        self.preempt_allocations: set = set()
        self.preempt_after_checkpoints: Optional[int] = None  # signal preemption at an allocation's N-th checkpoint
        self.acknowledged: List[str] = []
        self.progress: List[float] = []
        self.task_context: Dict[str, bytes] = {}  # task id -> model definition tgz
        self.rendezvous: Dict[str, Dict[str, Any]] = {}
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ HTTP plumbing
    def _handler_class(self):
        master = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: requests are recorded in master.requests
                pass

            def _dispatch(self, method: str):
                path, _, query = self.path.partition("?")
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with master.lock:
                    master.requests.append((method, path))
                for route_method, pattern, handler, _ in ROUTES:
                    match = re.fullmatch(pattern, path)
                    if route_method == method and match:
                        try:
                            status, answer = getattr(master, "_" + handler)(body, query, **match.groupdict())
                        except Exception as error:  # a bug here must fail the test, not hang the trial
                            with master.lock:
                                master.errors.append(f"{method} {path}: {error!r}")
                            status, answer = 500, {"error": {"error": repr(error)}}
                        break
                else:
                    with master.lock:
                        master.unanswered.append((method, path))
                    status, answer = 501, {"error": {"error": f"stand-in master does not answer {method} {path}"}}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

        return Handler

    # ------------------------------------------------------------------ experiments, as the SDK/CLI submit them
    def _create_experiment(self, body, query):
        request = bindings.v1CreateExperimentRequest.from_json(body)
        config = yaml.safe_load(request.config)
        files = [f.to_json() for f in (request.modelDefinition or [])]
        experiment_id = self.add_experiment(config, files, request.config)
        return 200, bindings.v1CreateExperimentResponse(
            experiment=self._experiment(experiment_id), config=self.experiments[experiment_id]["config"]).to_json()

    def add_experiment(self, config: Dict[str, Any], files: List[Dict[str, Any]], original: str) -> int:
        with self.lock:
            experiment_id = len(self.experiments) + 1
            self.experiments[experiment_id] = {
                "config": expand_config(config, self.storage_root), "original": original,
                "tgz": files_to_tgz(files), "trials": []}
        return experiment_id

    def _experiment(self, experiment_id: int) -> bindings.v1Experiment:
        exp = self.experiments[experiment_id]
        states = [self.trials[t].state for t in exp["trials"]]
        state = ("COMPLETED" if states and all(s == "COMPLETED" for s in states) else "ACTIVE")
        return bindings.v1Experiment(
            archived=False, config=exp["config"], id=experiment_id, jobId=f"job-{experiment_id}",
            name=exp["config"].get("name", "x"), numTrials=len(exp["trials"]), originalConfig=exp["original"],
            projectId=1, projectOwnerId=1, searcherType=exp["config"]["searcher"]["name"], startTime=NOW,
            state=getattr(bindings.experimentv1State, state), username="determined")

    def _get_experiment(self, body, query, exp):
        if int(exp) not in self.experiments:
            return 404, {"error": {"error": f"experiment {exp} not found"}}
        experiment = self._experiment(int(exp))
        return 200, bindings.v1GetExperimentResponse(experiment=experiment, config=experiment.config).to_json()

    def _experiment_checkpoints(self, body, query, exp):
        """Completed checkpoints of the experiment, sorted as asked (searcher metric by default)."""
        params = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
        config = self.experiments[int(exp)]["config"]
        found = [self._checkpoint(u) for u, c in self.checkpoints.items()
                 if self._checkpoint(u).training.experimentId == int(exp)]
        if params.get("sortByAttr") == "SORT_BY_BATCH_NUMBER":
            found.sort(key=lambda c: c.metadata.get("steps_completed", 0))
            descending = params.get("orderBy") == "ORDER_BY_DESC"
        else:
            found = [c for c in found if c.training.searcherMetric is not None]
            found.sort(key=lambda c: c.training.searcherMetric)
            descending = not config["searcher"].get("smaller_is_better", True)
            if params.get("orderBy") == "ORDER_BY_ASC":
                descending = False
        if descending:
            found.reverse()
        limit = int(params.get("limit") or 0) or len(found)
        offset = int(params.get("offset") or 0)
        page = found[offset:offset + limit]
        return 200, bindings.v1GetExperimentCheckpointsResponse(
            checkpoints=page, pagination=bindings.v1Pagination(
                offset=offset, limit=limit, startIndex=offset, endIndex=offset + len(page),
                total=len(found))).to_json()

    # ------------------------------------------------------------------ checkpoints
    def _report_checkpoint(self, body, query):
        checkpoint = bindings.v1Checkpoint.from_json(body)
        with self.lock:
            self.checkpoints[checkpoint.uuid] = body
            count = sum(1 for c in self.checkpoints.values() if c.get("allocationId") == checkpoint.allocationId)
            if count == self.preempt_after_checkpoints:
                self.preempt_allocations.add(checkpoint.allocationId)
        return 200, {}

    def _checkpoint(self, uuid: str) -> bindings.v1Checkpoint:
        """The reported checkpoint with the training metadata the master adds from its own records."""
        checkpoint = bindings.v1Checkpoint.from_json(copy.deepcopy(self.checkpoints[uuid]))
        allocation = checkpoint.allocationId or ""
        trial = next(t for t in self.trials.values() if allocation.startswith(f"{t.id}."))
        config = self.experiments[trial.experiment_id]["config"]
        steps = checkpoint.metadata.get("steps_completed")
        validation = [m for m in self.metrics
                      if m["trial"] == trial.id and m["group"] == "validation" and m["steps"] == steps]
        metric = config["searcher"]["metric"]
        searcher_metric = validation[-1]["metrics"].get(metric) if validation else None
        checkpoint.training = bindings.v1CheckpointTrainingMetadata(
            trialId=trial.id, experimentId=trial.experiment_id, experimentConfig=config,
            hparams=trial.hparams, searcherMetric=searcher_metric,
            validationMetrics=bindings.v1Metrics(avgMetrics=validation[-1]["metrics"]) if validation else None)
        return checkpoint

    def _get_checkpoint(self, body, query, uuid):
        if uuid not in self.checkpoints:
            return 404, {"error": {"error": f"checkpoint {uuid} not found"}}
        return 200, bindings.v1GetCheckpointResponse(checkpoint=self._checkpoint(uuid)).to_json()

    # ------------------------------------------------------------------ the trial's reports
    def _login(self, body, query):
        request = bindings.v1LoginRequest.from_json(body)
        return 200, bindings.v1LoginResponse(token="stand-in-token", user=bindings.v1User(
            active=True, admin=True, username=request.username)).to_json()

    def _me(self, body, query):
        return 200, bindings.v1GetMeResponse(user=bindings.v1User(active=True, admin=True,
                                                                   username="determined")).to_json()

    def _context_directory(self, body, query, task):
        return 200, bindings.v1GetTaskContextDirectoryResponse(
            b64Tgz=base64.b64encode(self.task_context[task]).decode()).to_json()

    def _accelerator_data(self, body, query, alloc):
        return 200, {}

    def _rendezvous(self, body, query, alloc, res):
        info = self.rendezvous[alloc]
        return 200, bindings.v1AllocationRendezvousInfoResponse(rendezvousInfo=bindings.v1RendezvousInfo(
            addresses=info["addresses"], rank=info["rank"], slots=info["slots"])).to_json()

    def _run_prepare(self, body, query):
        return 200, bindings.v1RunPrepareForReportingResponse(storageId=1).to_json()

    def _runner_metadata(self, body, query, trial):
        return 200, {}

    def _trial_json(self, trial: Trial) -> bindings.trialv1Trial:
        steps = [m["steps"] for m in self.metrics if m["trial"] == trial.id and m["group"] == "training"]
        return bindings.trialv1Trial(experimentId=trial.experiment_id, hparams=trial.hparams, id=trial.id,
                                     restarts=trial.run_id - 1, startTime=NOW,
                                     state=getattr(bindings.trialv1State, trial.state),
                                     totalBatchesProcessed=max(steps, default=0))

    def _get_trial(self, body, query, trial):
        return 200, bindings.v1GetTrialResponse(trial=self._trial_json(self.trials[int(trial)])).to_json()

    def _report_metrics(self, body, query, trial):
        request = bindings.v1ReportTrialMetricsRequest.from_json(body)
        group = request.group
        with self.lock:
            self.metrics.append({"trial": int(trial), "group": group, "steps": request.metrics.stepsCompleted,
                                 "run": request.metrics.trialRunId, "metrics": request.metrics.metrics.avgMetrics})
        return 200, {}

    def _progress(self, body, query, trial):
        self.progress.append(float(body["progress"]))
        return 200, {}

    def _best_validation(self, body, query, exp):
        config = self.experiments[int(exp)]["config"]["searcher"]
        values = [m["metrics"][config["metric"]] for m in self.metrics if m["group"] == "validation"
                  and self.trials[m["trial"]].experiment_id == int(exp) and config["metric"] in m["metrics"]]
        if not values:
            return 404, {"error": {"error": "no validation metrics yet"}}
        return 200, {"metric": min(values) if config.get("smaller_is_better", True) else max(values)}

    def _preemption(self, body, query, alloc):
        """Long poll: answers at once when preemption was signalled, else after ``timeout_seconds``
        (at most 2 s here, shorter than the master's, so no request outlives a test)."""
        params = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
        deadline = time.time() + min(float(params.get("timeout_seconds", 60)), 2.0)
        while time.time() < deadline and alloc not in self.preempt_allocations:
            time.sleep(0.05)
        return 200, bindings.v1AllocationPreemptionSignalResponse(
            preempt=alloc in self.preempt_allocations).to_json()

    def _ack_preemption(self, body, query, alloc):
        self.acknowledged.append(alloc)
        return 200, {}

    def answered_routes(self) -> List[str]:
        """Each route of :data:`ROUTES` that was called, with how often and the code that calls it."""
        lines = []
        for method, pattern, _, caller in ROUTES:
            count = sum(1 for m, p in self.requests if m == method and re.fullmatch(pattern, p))
            if count:
                lines.append(f"{method} {pattern} x{count}: {caller}")
        return lines

    # ------------------------------------------------------------------ the agent's side
    def training_metrics(self, trial_id: int, group: str = "training") -> List[Dict[str, Any]]:
        return [m for m in self.metrics if m["trial"] == trial_id and m["group"] == group]

    def trial_checkpoints(self, trial_id: int) -> List[bindings.v1Checkpoint]:
        found = [self._checkpoint(u) for u in self.checkpoints]
        found = [c for c in found if c.training.trialId == trial_id]
        return sorted(found, key=lambda c: c.metadata["steps_completed"])

    def checkpoint_dir(self, uuid: str) -> str:
        return os.path.join(self.storage_root, uuid)

    def record_checkpoint(self, trial_id: int, uuid: str, steps: int, validation: Optional[Dict[str, Any]] = None):
        """Records a checkpoint (and its validation) with the bodies the harness would POST, for
        tests of the SDK side that need no trial run."""
        allocation = f"{trial_id}.{max(self.trials[trial_id].run_id, 1)}"
        if validation is not None:
            metrics = bindings.v1TrialMetrics(metrics=bindings.v1Metrics(avgMetrics=validation), trialId=trial_id,
                                              trialRunId=1, stepsCompleted=steps)
            self._report_metrics(bindings.v1ReportTrialMetricsRequest(group="validation", metrics=metrics).to_json(),
                                 "", str(trial_id))
        self._report_checkpoint(bindings.v1Checkpoint(
            allocationId=allocation, metadata={"steps_completed": steps}, resources={}, taskId=f"task-{trial_id}",
            training=bindings.v1CheckpointTrainingMetadata(), uuid=uuid, reportTime=NOW,
            state=bindings.checkpointv1State.COMPLETED).to_json(), "")

    def new_trial(self, experiment_id: int, seed: int = 0) -> int:
        """A trial of the experiment, its hyperparameters sampled from the config's search space
        with ``seed`` (:func:`sample_hyperparameters`; a config of plain values gives those values)."""
        exp = self.experiments[experiment_id]
        with self.lock:
            trial_id = len(self.trials) + 1
            hparams = sample_hyperparameters(exp["config"]["hyperparameters"], random.Random(seed))
            self.trials[trial_id] = Trial(trial_id, experiment_id, hparams)
            exp["trials"].append(trial_id)
        return trial_id

    def launch(self, trial_id: int, latest_checkpoint: Optional[str] = None, steps_completed: Optional[int] = None,
               timeout: float = 300, log_path: Optional[str] = None) -> subprocess.CompletedProcess:
        """Runs one allocation of the trial (one container with all its slots) to its end, as an agent
        would; ``latest_checkpoint`` and ``steps_completed`` are what the master hands a restarted
        trial (its latest checkpoint) or a warm start (another trial's, with ``steps_completed = 0``).
        Returns the finished process (stdout and stderr together in ``.stdout``)."""
        trial = self.trials[trial_id]
        experiment = self.experiments[trial.experiment_id]
        config = experiment["config"]
        slots = int(config["resources"]["slots_per_trial"])
        trial.run_id += 1
        allocation = f"{trial_id}.{trial.run_id}"
        task = f"task-{trial_id}"
        self.task_context[task] = experiment["tgz"]
        self.rendezvous[allocation] = {"addresses": ["127.0.0.1"], "rank": 0, "slots": [slots]}
        if latest_checkpoint and steps_completed is None:
            steps_completed = int(bindings.v1Checkpoint.from_json(self.checkpoints[latest_checkpoint])
                                  .metadata["steps_completed"])
        env = {key: value for key, value in os.environ.items() if not key.startswith("DET_")}
        env.update({
            "PATH": f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",  # `python3` is the image's python
            "DET_MASTER": self.url, "DET_CLUSTER_ID": "stand-in", "DET_AGENT_ID": "agent-0",
            "DET_SLOT_IDS": json.dumps(list(range(slots))), "DET_TASK_ID": task, "DET_ALLOCATION_ID": allocation,
            "DET_SESSION_TOKEN": "stand-in-token", "DET_USER": "determined", "DET_USER_TOKEN": "stand-in-token",
            "DET_TASK_TYPE": "TRIAL", "DET_RESOURCES_ID": f"resources-{allocation}",
            "DET_RESOURCES_TYPE": "docker-container", "DET_CONTAINER_ID": f"container-{allocation}",
            "DET_TRIAL_ID": str(trial_id), "DET_EXPERIMENT_ID": str(trial.experiment_id), "DET_TRIAL_SEED": "0",
            "DET_HPARAMS": json.dumps(trial.hparams), "DET_EXPERIMENT_CONFIG": json.dumps(config),
            "DET_STEPS_COMPLETED": str(steps_completed or 0), "DET_TRIAL_RUN_ID": str(trial.run_id),
            "STAND_IN_HOST_PATH": self.storage_root, "CUDA_VISIBLE_DEVICES": "",
            # Ports the master's port registry would hand out (fixed defaults collide between tests).
            "C10D_PORT": str(free_port()), "INTER_TRAIN_PROCESS_COMM_PORT_1": str(free_port()),
            "INTER_TRAIN_PROCESS_COMM_PORT_2": str(free_port()), "PYTHONUNBUFFERED": "1",
        })
        if latest_checkpoint:
            env["DET_LATEST_CHECKPOINT"] = latest_checkpoint
        command = ["unshare", "--mount", "--propagation", "private", "bash", "-c", CONTAINER_SCRIPT]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd="/", start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # e.g. ranks waiting on each other: end the whole container
            import psutil  # a dependency of determined

            # Every process of the container, listed before any dies: torchrun's workers leave the
            # process group, and would otherwise keep the output pipe open.
            tree = psutil.Process(process.pid).children(recursive=True)
            for member in [psutil.Process(process.pid)] + tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            output, _ = process.communicate()
            output += f"\n[stand-in] allocation {allocation} killed after {timeout} s\n"
        done = subprocess.CompletedProcess(command, process.returncode, output)
        trial.exit_codes.append(done.returncode)
        trial.logs.append(done.stdout)
        preempted = allocation in self.preempt_allocations
        if log_path:
            reported = [(c["uuid"], c["metadata"]["steps_completed"]) for c in self.checkpoints.values()
                        if c.get("allocationId") == allocation]
            with open(log_path, "a") as handle:
                handle.write(f"===== stand-in: allocation {allocation} of trial {trial_id} ({slots} slots), "
                             f"DET_LATEST_CHECKPOINT={latest_checkpoint}, DET_STEPS_COMPLETED={steps_completed or 0}\n"
                             f"{done.stdout}"
                             f"===== stand-in: allocation {allocation} exit {done.returncode}; checkpoints reported "
                             f"{reported}; preemption signalled: {preempted}, acknowledged: "
                             f"{allocation in self.acknowledged}\n")
        trial.state = "COMPLETED" if done.returncode == 0 and not preempted else "ACTIVE"
        return done


# The container's side, as the master's entrypoint.sh runs it; the two mounts give this process
# tree its own /run/determined (cluster info files, working directory) and the shared_fs mount.
CONTAINER_SCRIPT = f"""
set -euo pipefail
mount -t tmpfs tmpfs {RUN_DIR}
mount --bind "$STAND_IN_HOST_PATH" {SHARED_FS}
mkdir -p {RUN_DIR}/workdir {RUN_DIR}/info
cd {RUN_DIR}/workdir
python3 -m determined.exec.prep_container --download_context_directory --resources --proxy
python3 -m determined.exec.prep_container --rendezvous
exec python3 -m determined.exec.launch
"""


def container_support() -> Optional[str]:
    """Why trial containers cannot be started here, or None (needs root for the mounts and unshare)."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    if os.geteuid() != 0:
        return "starting a stand-in trial container needs root (mount namespace, /run/determined)"
    try:
        os.makedirs(RUN_DIR, exist_ok=True)
        os.makedirs(SHARED_FS, exist_ok=True)
    except OSError as error:
        return f"cannot create the container mount points: {error}"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs",
                            RUN_DIR], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --mount is not permitted here: {probe.stderr.strip()}"
    return None


@contextlib.contextmanager
def stand_in_master(storage_root: str):
    master = StandInMaster(storage_root)
    try:
        yield master
    finally:
        master.close()
