"""Keeping the processes of a multi-process run one run: identical replicas, checked.

BYOL with data parallelism (section 3.3: the paper trains on 512 TPU cores) relies on every replica
holding the same online network, the same target network xi (updated by the EMA of section 3.1
from the all-reduced online weights) and, in this project, the same linear-evaluation heads. DDP keeps
the online parameters in step; batch-norm running statistics are per process unless batch norm is
synchronised, so :func:`broadcast_buffers` copies rank 0's after every step in that case.

:func:`check_identical` compares a SHA-256 digest of every top-level part of the networks across
ranks (after every checkpoint, so a checkpoint is always the state of all replicas) and raises
:class:`ReplicaDivergenceError` naming the parts and ranks that differ. :func:`state_digests` gives
the same digests for a loaded checkpoint, so the saved state can be compared with the live one.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Iterable, List, Mapping

import torch
import torch.distributed as dist


class ReplicaDivergenceError(RuntimeError):
    """The processes of one run hold different weights."""


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def state_digests(state: Mapping[str, torch.Tensor], prefix: str = "") -> Dict[str, str]:
    """SHA-256 per top-level part of a ``state_dict`` (DDP's ``module.`` prefix ignored)."""
    hashes: Dict[str, "hashlib._Hash"] = {}
    for key in sorted(state):
        value = state[key]
        if not torch.is_tensor(value):
            continue
        name = key[len("module."):] if key.startswith("module.") else key
        part = prefix + name.split(".")[0]
        digest = hashes.setdefault(part, hashlib.sha256())
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(_tensor_bytes(value))
    return {part: digest.hexdigest() for part, digest in hashes.items()}


def trial_digests(models: Iterable[torch.nn.Module], heads: torch.nn.Module) -> Dict[str, str]:
    """Digests of what a checkpoint holds: the wrapped model(s) and the linear heads."""
    digests: Dict[str, str] = {}
    for index, model in enumerate(models):
        digests.update(state_digests(model.state_dict(), prefix="" if index == 0 else f"model{index}."))
    digests.update(state_digests(heads.state_dict(), prefix="heads."))
    return digests


def check_identical(digests: Dict[str, str], gathered: List[Dict[str, str]]) -> None:
    """Raises :class:`ReplicaDivergenceError` unless every rank's digests equal rank 0's."""
    reference = gathered[0]
    differing = {}
    for rank, other in enumerate(gathered[1:], start=1):
        for part in sorted(set(reference) | set(other)):
            if reference.get(part) != other.get(part):
                differing.setdefault(part, []).append(rank)
    if differing:
        detail = "; ".join(f"{part} differs on rank(s) {ranks} from rank 0" for part, ranks in differing.items())
        raise ReplicaDivergenceError(
            f"the {len(gathered)} processes of this run no longer hold identical weights: {detail}. This is a "
            f"bug or a faulty device, not a setting: stop and resume from the last checkpoint")


def check_trial(context, heads: torch.nn.Module, label: str) -> None:
    """Every rank: compares this rank's digests with all others' (Determined's ``allgather``); rank 0
    prints them, so logs show what was compared."""
    digests = trial_digests(context.models, heads)
    check_identical(digests, context.distributed.allgather(digests))
    if context.distributed.rank == 0:
        listed = " ".join(f"{part}={digest[:12]}" for part, digest in sorted(digests.items()))
        print(f"[byol] {label}: weights identical on {context.distributed.size} ranks ({listed})", flush=True)


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, source: int = 0) -> None:
    """Copies rank ``source``'s buffers (batch-norm statistics) to every rank, one message per dtype."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for dtype in sorted(by_dtype, key=str):
        buffers = by_dtype[dtype]
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=source)
        offset = 0
        for buffer in buffers:
            buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()
