"""Several processes (torchrun, gloo on CPU) behave as one run: global batch semantics, batch norm
over the global batch, bit-identical replicas after every update, and validation reducers whose
results over 2 processes equal those of 1 process over the same data."""
import math
import re
import subprocess
import textwrap

import pytest
import torch
from torch import nn

from run_helpers import (
    ROOT,
    at_step,
    complete,
    environment,
    load,
    metrics,
    run_on_two_ranks,
    saved_digests,
    straight_run,
    torchrun,
    train,
    write_config,
)
from runtime import launch, sync_batchnorm
from runtime.settings import parse_settings
from utils import ConfigError


def test_global_batch_must_divide_into_slots(tmp_path):
    data = {"dataset": "digits", "root": str(tmp_path)}
    assert parse_settings({"global_batch_size": 32}, data, slots=2).global_batch_size == 32
    with pytest.raises(ConfigError, match="global_batch_size.*divisible by the number of slots \\(3\\)"):
        parse_settings({"global_batch_size": 32}, data, slots=3)


def test_all_reduce_batch_norm_converts_and_equals_batch_norm_in_one_process():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 5), nn.BatchNorm1d(5))
    net[1].weight.data.uniform_()
    reference = net.double()
    converted = sync_batchnorm.convert_sync_batchnorm(__import__("copy").deepcopy(net), torch.device("cpu"))
    assert [type(m) for m in converted.modules()].count(sync_batchnorm.AllReduceBatchNorm) == 2
    assert converted[1].weight.dtype == torch.float64 and torch.equal(converted[1].weight, net[1].weight)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    for mode in (True, False):
        reference.train(mode), converted.train(mode)
        assert torch.allclose(converted(x), reference(x), atol=1e-12)
    for ours, theirs in zip(converted.buffers(), reference.buffers()):
        assert torch.allclose(ours.double(), theirs.double(), atol=1e-12)


# Top-level aten ops of a synchronised batch-norm layer (forward + backward, views together) at most
# this many times those of a plain nn.BatchNorm2d layer (9). Measured: 58 (one view), 60 (two views),
# was 107 per view; not the 2x asked in issue 16: without CPU kernels for torch's fused
# synchronised-batch-norm primitives the statistics' small per-(view, channel) arithmetic is ~40
# element-wise ops (runtime/sync_batchnorm.py says why).
SYNC_OPS_BOUND = 7

SYNC_BN_CHECK = textwrap.dedent("""
    import copy, sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    from batchnorm import view_groups
    from runtime.sync_batchnorm import convert_sync_batchnorm
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    collectives = []
    all_reduce = dist.all_reduce
    def counted(tensor, *args, **kwargs):
        collectives.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)
    dist.all_reduce = counted
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
                              torch.nn.Flatten(), torch.nn.Linear(36, 5),
                              torch.nn.BatchNorm1d(5, momentum=None)).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5), net[1].bias.normal_(), net[5].running_mean.normal_()
    for views in (1, 2):
        whole = copy.deepcopy(net)          # one process, each view of the global batch on its own
        synced = convert_sync_batchnorm(copy.deepcopy(net))
        # the global batch of each view, away from zero mean and unlike each other
        global_views = [torch.randn(10, 3, 5, 5, dtype=torch.float64) * (v + 1) + 3.0 for v in range(views)]
        # Even shards, uneven shards, and a rank with no image at all.
        for step, sizes in enumerate([(5, 5), (7, 3), (10, 0), (5, 5)]):
            shards = [view.split(sizes)[rank].clone().requires_grad_() for view in global_views]
            collectives.clear()
            with view_groups(views):
                out = synced(torch.cat(shards))
            assert collectives == [views * (2 * 4 + 1), views * (2 * 5 + 1)], f"one per layer: {{collectives}}"
            (out.pow(3).sum() / 10).backward()   # this rank's part of the global mean loss of each view
            assert collectives[2:] == [views * 2 * 5, views * 2 * 4], f"one per layer backward: {{collectives}}"
            for p in synced.parameters():
                dist.all_reduce(p.grad)
            whole_views = [view.clone().requires_grad_() for view in global_views]
            fulls = [whole(view) for view in whole_views]
            sum(full.pow(3).sum() for full in fulls).div(10).backward()
            for v, full in enumerate(fulls):
                ours = out.chunk(views)[v]
                assert torch.allclose(ours, full.split(sizes)[rank], atol=1e-10), f"outputs {{sizes}} view {{v}}"
                assert torch.allclose(shards[v].grad, whole_views[v].grad.split(sizes)[rank], atol=1e-10), \
                    f"input gradients {{sizes}} view {{v}}"
            for a, b in zip(synced.parameters(), whole.parameters()):
                assert torch.allclose(a.grad, b.grad, atol=1e-9), f"gradients {{sizes}}"
                a.grad = b.grad = None
            for a, b in zip(synced.buffers(), whole.buffers()):   # updated once per view, in order
                assert torch.allclose(a.double(), b.double(), atol=1e-10), f"running statistics {{sizes}}"
        # float32 under bf16 autocast: statistics in float32, close to the full batch, both directions
        synced32, whole32 = copy.deepcopy(synced).float(), copy.deepcopy(whole).float()
        for sizes in [(5, 5), (10, 0)]:
            shards = [view.float().split(sizes)[rank].clone().requires_grad_() for view in global_views]
            whole_views = [view.float().requires_grad_() for view in global_views]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with view_groups(views):
                    out = synced32(torch.cat(shards))
                fulls = [whole32(view) for view in whole_views]
            assert out.dtype == fulls[0].dtype and torch.isfinite(out).all()
            (out.float().pow(2).sum() / 10).backward()
            sum(full.float().pow(2).sum() for full in fulls).div(10).backward()
            for v, full in enumerate(fulls):
                assert torch.allclose(out.chunk(views)[v].float(), full.float().split(sizes)[rank], atol=0.05), "bf16"
                assert torch.allclose(shards[v].grad, whole_views[v].grad.split(sizes)[rank], atol=0.05), "bf16 grad"
            for a, b in zip(synced32.buffers(), whole32.buffers()):
                assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2), "bf16 running statistics"
    # Host work per layer, forward + backward (one two-view batch, a sum as the loss): top-level aten
    # ops against a plain nn.BatchNorm2d layer on the same batch (collectives not counted).
    sys.path.insert(0, {root!r} + "/tests")
    from run_helpers import batch_norm_layer_ops as layer_ops
    plain = sum(layer_ops(torch.nn.BatchNorm2d(8), 1).values())
    synced = {{views: layer_ops(convert_sync_batchnorm(torch.nn.BatchNorm2d(8)), views) for views in (1, 2)}}
    ops = {{views: sum(counts.values()) for views, counts in synced.items()}}
    assert ops[1] <= SYNC_OPS_BOUND * plain and ops[2] <= SYNC_OPS_BOUND * plain, (plain, synced)
    # the deferred non-finite check: rank 1's NaN at step 3 is known to both ranks
    from runtime.nonfinite import NonFiniteWatch
    watch = NonFiniteWatch(period=2)
    for step in range(5):
        watch.record(torch.tensor(float("nan") if rank == 1 and step >= 3 else 1.0), step)
    assert watch.agree(rank, world) == ([(1, 3)], False), watch.agree(rank, world)
    # a stop asked of rank 0 alone (SIGTERM, stops.py) is known to both in the same all_reduce
    assert watch.agree(rank, world, stop=rank == 0) == ([(1, 3)], True)
    # ... and which rank got which signal: a SIGTERM to rank 1 alone is named on rank 0
    assert watch.agree(rank, world, stop=15 if rank == 1 else 0) == ([(1, 3)], True)
    assert watch.stop_signals == {{1: 15}}, watch.stop_signals
    try:
        torch.nn.SyncBatchNorm(4)(torch.randn(4, 4, 2, 2))
        verdict = "torch's SyncBatchNorm runs on CPU"
    except ValueError as error:
        verdict = f"torch's SyncBatchNorm refuses CPU: {{error}}"
    with open(f"{{sys.argv[1]}}/rank{{rank}}.ok", "w") as handle:  # one file per rank: stdout interleaves
        handle.write(f"{{verdict}}; top-level aten ops per layer forward + backward: nn.BatchNorm2d {{plain}}, "
                     f"synchronised, 1 view {{ops[1]}}, 2 views {{ops[2]}}")
""")


@pytest.mark.slow
def test_all_reduce_batch_norm_over_two_processes_equals_one_batch(tmp_path):
    run_on_two_ranks(tmp_path, "check_sync_bn.py", SYNC_BN_CHECK.format(root=ROOT).replace(
        "SYNC_OPS_BOUND", str(SYNC_OPS_BOUND)))
    print((tmp_path / "rank0.ok").read_text())


@pytest.mark.slow
def test_two_processes_hold_identical_replicas_after_every_update():
    _, directory, stdout = straight_run(2)
    assert "batch norm synchronised across 2 processes" in stdout
    reports = re.findall(r"\[byol\] checkpoint (\S+) at step (\d+): weights identical on 2 ranks \(([^)]*)\)", stdout)
    assert [int(step) for _, step, _ in reports] == [1, 2, 3, 4]  # a checkpoint after every update
    for _uuid, step, listed in reports:
        live = dict(item.split("=") for item in listed.split())
        saved = {part: digest[:12] for part, digest in saved_digests(at_step(directory, int(step))).items()}
        assert live == saved, f"step {step}: the compared weights are not those saved"
        assert {"target_encoder", "target_projector", "heads.heads", "online_encoder"} <= set(live)
    # Targets moved: the digests differ from step to step.
    assert len({dict(item.split("=") for item in r[2].split())["target_encoder"] for r in reports}) == 4


@pytest.mark.slow
def test_learning_rate_and_schedule_follow_the_global_batch():
    """Same global batch in 1 and 2 processes: the same learning rates (scaled by the global batch)."""
    rates = []
    for nproc in (1, 2):
        _, directory, _ = straight_run(nproc)
        history = load(at_step(directory, 4))["callbacks"]["metrics_history"]["training"]
        rates.append([round(entry["lr"], 12) for entry in history])
    assert rates[0] == rates[1] and len(rates[0]) >= 1
    steps = [step for step, _ in complete(straight_run(2)[1])]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("classifier_validation", [True, False])
def test_reducers_equal_over_one_and_two_processes(tmp_path, classifier_validation):
    """Validation from the same checkpoint (no training left) with 1 and with 2 processes."""
    config, directory, _ = straight_run(1)
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"metrics{nproc}.json"
        train(["--config", config, "--checkpoint-dir", str(tmp_path / f"ck{nproc}"), "--resume-from",
               at_step(directory, 2), "--batches", "2", "--metrics-out", str(out),
               "--set", f"classifier_validation={str(classifier_validation).lower()}",
               "--set", "classifier={learning_rates: [0.4, 0.1], train_epochs: 1, batch_size: 64}"], nproc)
        # timings, and what names the run rather than measures it (its folder, its resolved settings)
        timings = ("wall_seconds", "training_seconds", "last_checkpoint", "checkpoint_path", "config")
        results.append({k: v for k, v in metrics(str(out)).items() if k not in timings})
    one, two = results
    if classifier_validation:
        assert "test_accuracy" in one and one["validation_accuracy_lr0.4"] > 0
        for key in one:
            if key != "validation_byol_loss":
                assert one[key] == two[key], key  # counts summed over shards: exact
    else:
        assert math.isfinite(one["validation_byol_loss"])
        # same views, same data; only the order of floating-point sums differs
        assert one["validation_byol_loss"] == pytest.approx(two["validation_byol_loss"], rel=1e-6)


def test_local_runs_take_free_ports_for_determined_messaging():
    ports = launch.free_ports(2)
    assert len(set(ports)) == 2 and all(1024 <= port < 65536 for port in ports)


def test_divergence_check_names_parts_and_ranks():
    from runtime import replicas

    same = {"target_encoder": "a", "heads.heads": "b"}
    replicas.check_identical(same, [same, dict(same)])
    with pytest.raises(replicas.ReplicaDivergenceError, match=r"target_encoder differs on rank\(s\) \[2\]"):
        replicas.check_identical(same, [same, dict(same), {"target_encoder": "x", "heads.heads": "b"}])


UNSYNCED_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from runtime import replicas
    replicas.broadcast_buffers = lambda module: None  # the fault: per-process batch-norm statistics kept
    import model_def
    sys.exit(model_def.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_replicas_that_drift_apart_stop_the_run(tmp_path):
    """Without synchronised batch norm, per-process running statistics would make the replicas differ;
    rank 0's are broadcast after every step. Disabling that must be caught at the first checkpoint."""
    config = write_config(str(tmp_path))
    script = tmp_path / "unsynced.py"
    script.write_text(UNSYNCED_RUN.format(root=ROOT))
    result = subprocess.run([*torchrun(2), str(script), "--config", config, "--checkpoint-dir",
                             str(tmp_path / "ck"), "--batches", "2", "--set", "sync_batch_norm=false"],
                            cwd=ROOT, env=environment(2), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "per process (not synchronised)" in result.stdout
    assert re.search(r"error: the 2 processes of this run no longer hold identical weights: .*target_encoder "
                     r"differs on rank\(s\) \[1\]", result.stderr), result.stderr[-3000:]
