"""Batch normalisation with statistics over the global batch, on every device.

BYOL normalises with statistics over the whole (global) batch: the paper trains with batch norm
synchronised across its 512 TPU cores (section 3.3, appendix A; its batch size of 4096 is the global
one). :class:`AllReduceBatchNorm` does this with ONE ``all_reduce`` per layer and pass: each rank
sums ``[sum x, sum x^2, n]`` per channel over its own batch and the collective adds them up, so
the forward pass needs no host synchronisation. It is used on CPU (gloo) and GPU (nccl) alike;
``torch.nn.SyncBatchNorm`` is not used: it refuses CPU tensors ("SyncBatchNorm expected input
tensor to be on GPU") and on CUDA reads the batch sizes of all ranks back to the host (masked
indexing) in every layer, a device synchronisation per batch-norm layer per step.

The sums are taken about a per-channel shift ``K`` (the running mean, identical on every rank, or
0 without running statistics): var = E[(x-K)^2] - E[x-K]^2 cancels badly only when |mean - K| is
much larger than the standard deviation, which the running mean keeps from happening. Statistics
are computed in float32 whatever the input dtype (bf16 autocast).

A small autograd function makes the collective differentiable (``torch.distributed.nn``'s
differentiable collectives are deprecated in torch 2.x): its backward pass all-reduces the gradient
of the three sums, one more collective per layer. So autograd differentiates through the
cross-rank statistics exactly like a single process on the concatenated batch; DDP then averages
parameter gradients as usual. Running statistics are updated with the global mean and the unbiased
global variance, as ``nn.BatchNorm`` would on the whole batch, so they are identical on every rank.
A rank may hold fewer images than the others, or none.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` with its exact gradient: every rank's output is the same sum, so the
    gradient of the summed loss w.r.t. each rank's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(tensor)


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class AllReduceBatchNorm(_BatchNorm):
    """``BatchNorm{1,2,3}d`` whose training-mode statistics span every rank's batch.

    Evaluation mode (and single-process runs) is plain batch norm with the running statistics.
    Every rank must call ``forward`` in training mode the same number of times (it is a collective).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats or _distributed_world() == 1:
            return self._local(input)
        channels = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        shape = [1, channels] + [1] * (input.dim() - 2)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        local_count = x.numel() // channels   # a host number: shapes live on the host
        shift = (self.running_mean.detach().to(x.dtype, copy=True) if self.running_mean is not None
                 else x.new_zeros(channels)).view(shape)
        shifted = x - shift
        sums = torch.cat([shifted.sum(dim=dims), shifted.square().sum(dim=dims),
                          x.new_full((1,), float(local_count))])
        total = all_reduce_sum(sums)           # the one collective of this layer's forward pass
        n = total[-1]
        if local_count < 2 and n.item() < 2:   # only a rank with (almost) no images reads n back
            raise ValueError(f"batch norm needs more than 1 value per channel over all ranks, got {int(n.item())}")
        shifted_mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - shifted_mean.square()).clamp_min(0.0)
        mean = shifted_mean + shift.view(-1)
        out = (shifted - shifted_mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        return out.to(input.dtype)

    def _local(self, input: torch.Tensor) -> torch.Tensor:
        factor = self._momentum_factor()
        training = self.training or self.running_mean is None
        return F.batch_norm(input, self.running_mean if not self.training or self.track_running_stats else None,
                            self.running_var if not self.training or self.track_running_stats else None,
                            self.weight, self.bias, training, factor, self.eps)

    def _momentum_factor(self) -> float:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                return 1.0 / float(self.num_batches_tracked.item())
        return 0.0 if self.momentum is None else self.momentum

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        factor = self._momentum_factor()
        unbiased = var * n / (n - 1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, device: Optional[torch.device] = None) -> nn.Module:
    """Every ``BatchNorm*d`` of ``module`` made global-batch (:class:`AllReduceBatchNorm`, on any
    device; ``device`` is accepted for older callers and unused), with weights, buffers and
    train/eval mode carried over."""
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        like = module.weight if module.affine else module.running_mean
        factory = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        converted = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                       module.track_running_stats, **factory)
        with torch.no_grad():
            if module.affine:
                converted.weight.copy_(module.weight)
                converted.bias.copy_(module.bias)
                converted.weight.requires_grad_(module.weight.requires_grad)
                converted.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            converted.running_mean.copy_(module.running_mean)
            converted.running_var.copy_(module.running_var)
            converted.num_batches_tracked.copy_(module.num_batches_tracked)
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _convert(child))
    return converted
