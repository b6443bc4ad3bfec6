"""ATen's rules for the multi-tensor (``torch._foreach_*``) fast path on CUDA, checked on the CPU.

``check_fast_path_restrictions`` (aten/src/ATen/native/ForeachUtils.h) sends a call down the fast
path only when (a) every tensor of every list shares one device and one dtype, is strided and
non-overlapping and dense, and (b) the tensors paired across lists have equal sizes and strides
(and a scalar does not promote the tensors' dtype). On the CPU every call takes the per-tensor path,
so the rules are checked here on the arguments of each call, recorded below the Python API with a
dispatch mode.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class ForeachCalls(TorchDispatchMode):
    """Records ``(op name, tensor lists, scalars)`` of every ``_foreach_`` op dispatched inside."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        if name.startswith("_foreach_"):
            values = list(args) + list(kwargs.values())
            lists = [list(a) for a in values if isinstance(a, (list, tuple)) and a
                     and all(isinstance(t, torch.Tensor) for t in a)]
            scalars = [a for a in values if isinstance(a, (int, float)) and not isinstance(a, bool)]
            self.calls.append((name, lists, scalars))
        return func(*args, **kwargs)


@contextlib.contextmanager
def recorded_foreach_calls() -> Iterator[List[tuple]]:
    mode = ForeachCalls()
    with mode:
        yield mode.calls


def _dense(tensor: torch.Tensor) -> bool:
    return tensor.layout == torch.strided and (
        tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)))


def fast_path_violations(calls: List[tuple]) -> List[str]:
    """One line per call that would leave the fast path, saying which rule it breaks."""
    problems = []
    for name, lists, scalars in calls:
        first = lists[0][0]
        for tensor in (t for tensor_list in lists for t in tensor_list):
            if (tensor.device, tensor.dtype) != (first.device, first.dtype):
                problems.append(f"{name}: mixes {first.dtype} on {first.device} with {tensor.dtype} on {tensor.device}")
                break
            if not _dense(tensor):
                problems.append(f"{name}: a tensor of sizes {tuple(tensor.shape)} strides {tensor.stride()} "
                                "is not non-overlapping and dense")
                break
        for other in lists[1:]:
            for a, b in zip(lists[0], other):
                if a.shape != b.shape or a.stride() != b.stride():
                    problems.append(f"{name}: pairs sizes {tuple(a.shape)} strides {a.stride()} with sizes "
                                    f"{tuple(b.shape)} strides {b.stride()}")
                    break
        if any(isinstance(s, float) for s in scalars) and not first.dtype.is_floating_point:
            problems.append(f"{name}: a float scalar promotes {first.dtype}")
    return problems
