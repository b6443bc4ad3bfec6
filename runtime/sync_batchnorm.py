"""Batch normalisation over the global batch, per view, on every device.

Per-view statistics in one pass (both views as one batch, each normalised with its own statistics)
are ``batchnorm.py``; :class:`AllReduceBatchNorm` shares its forward and adds the global batch.

**Synchronised batch norm.** BYOL normalises with statistics over the whole (global) batch: the
paper trains with batch norm synchronised across its 512 TPU cores (section 3.3, appendix A; its
batch of 4096 is the global one). :class:`AllReduceBatchNorm` (made by
:func:`convert_sync_batchnorm`) computes each view's statistics over that view of the global batch
with ONE ``all_reduce`` per layer in the forward pass and ONE in the backward pass, each carrying the
statistics of all view groups: forward ``[sum (x-K), sum (x-K)^2, n]`` per view and channel, backward
``[sum dy, sum dy * x_hat]``, where K is the running mean (identical on every rank; 0 without running
statistics), so that var = E[(x-K)^2] - E[x-K]^2 cancels badly only when |mean - K| is far larger
than the standard deviation, which the running mean keeps from happening. It is a custom autograd
function (:class:`_SynchronisedBatchNorm`) with the gradient written out (that of one process on the
concatenated batch of each view), not autograd through element-wise ops. Host work per layer,
forward + backward, in top-level aten ops (``tests/test_distributed.py`` prints and bounds them):
``nn.BatchNorm2d`` 9; before, 107 and 2 collectives per view (214 and 4 for both views); now 58 for
one view, 60 for both views together, with 2 collectives.

*Why these primitives.* torch's fused ``batch_norm_stats`` / ``batch_norm_elemt`` /
``batch_norm_gather_stats_with_counts`` / ``batch_norm_backward_reduce`` /
``batch_norm_backward_elemt`` (those of ``torch.nn.SyncBatchNorm``) have CUDA kernels only: in torch
2.14 each raises "Could not run ... with arguments from the 'CPU' backend", and CPU (gloo) must stay
supported with one code path that the CPU tests check; ``torch.nn.SyncBatchNorm`` itself refuses CPU
tensors and on CUDA reads the batch sizes of all ranks back to the host in every layer. A compiled
function would compile once per layer shape and dtype (minutes for a ResNet-50 on a CPU) and is left
to ``compile: true``. So the local statistics are one ``torch.var_mean`` (one Welford pass over both
views; on a float32 copy of bf16 inputs), the normalisation one fused multiply-add over the whole 2B batch
with per-(view, channel) coefficients, and the backward's per-view sums come from torch's fused
``native_batch_norm_backward`` (CPU and CUDA kernels), with no host synchronisation: the only host
read is of the global count when a rank holds fewer than 2 values per channel. ``momentum=None``
(a cumulative average) reads ``num_batches_tracked`` as ``nn.BatchNorm`` does; the default momentum
reads nothing. A rank may hold fewer images than the others, or none; DDP then averages parameter
gradients as usual (each rank returns its own sums for the scale and bias).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm import PerViewForward


class AllReduceBatchNorm(PerViewForward, _BatchNorm):
    """``BatchNorm{1,2,3}d`` whose training-mode statistics span every rank's batch, per view group
    inside :func:`view_groups`.

    Evaluation mode (and single-process runs) is plain batch norm with the running statistics.
    Every rank must call ``forward`` in training mode the same number of times (it is a collective).
    """

    synchronised = True

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _global_statistics(self, input: torch.Tensor, running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], factors: Sequence[float], views: int) -> torch.Tensor:
        return _SynchronisedBatchNorm.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                            factors, views)


class _SynchronisedBatchNorm(torch.autograd.Function):
    """Per-view batch norm over the global batch: one ``all_reduce`` forward, one backward.

    The input is viewed as ``(views, B, C, rest)`` (no copy for contiguous and channels-last
    tensors); per-view statistics are ``(views, C)``, broadcast as ``(views, 1, C, 1)``.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, factors, views):
        channels = input.shape[1]
        shape = (views, input.shape[0] // views, channels, math.prod(input.shape[2:]))
        if not _dense(input):                    # neither contiguous nor channels-last: rare
            input = input.contiguous()
        x = input.view(shape)
        count = x.shape[1] * x.shape[3]          # per view on this rank: a host number (shapes)
        precise = x if x.dtype in (torch.float32, torch.float64) else x.float()
        shift = None if running_mean is None else _as(running_mean, precise.dtype)
        if count:
            var, mean = torch.var_mean(precise, dim=(1, 3), correction=0)
            centred = mean if shift is None else mean - shift
            payload = torch.cat([centred, torch.addcmul(var, centred, centred), centred.new_ones(views, 1)],
                                dim=1).mul_(count)
        else:
            payload = precise.new_zeros(views, 2 * channels + 1)
        dist.all_reduce(payload)                 # the one collective of this layer's forward pass
        total = payload[:, -1:]                  # (views, 1): the global count of each view
        if count < 2 and int(total.min().item()) < 2:   # only a rank with (almost) no images reads it
            raise ValueError(f"batch norm needs more than 1 value per channel over all ranks, got "
                             f"{int(total.min().item())}")
        mean, mean_square, _ = (payload / total).split([channels, channels, 1], dim=1)
        var = torch.addcmul(mean_square, mean, mean, value=-1).clamp_min_(0.0)
        if shift is not None:
            mean = mean + shift
        invstd = (var + eps).rsqrt_()
        scale = invstd if weight is None else invstd * weight
        offset = (torch.addcmul(bias, mean, scale, value=-1) if bias is not None
                  else torch.mul(mean, scale).neg_())
        # A fresh output (not a view: layers after it may work in place), in the input's layout and dtype.
        out = torch.empty_like(input)
        torch.addcmul(offset.view(views, 1, channels, 1), x, scale.view(views, 1, channels, 1), out=out.view(shape))
        if running_mean is not None:             # once per view, in view order, as separate passes
            unbiased = var.mul_(total).div_(total - 1).unbind()
            for view_mean, view_var, factor in zip(mean.unbind(), unbiased, factors):
                torch._foreach_lerp_([running_mean, running_var],
                                     [_as(view_mean, running_mean.dtype), _as(view_var, running_var.dtype)], factor)
        ctx.save_for_backward(x, scale, total, mean, invstd)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.input_shape = input.shape
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, scale, total, mean, invstd = ctx.saved_tensors
        views, channels = x.shape[0], x.shape[2]
        dy = grad_output.reshape(x.shape)
        if x.shape[1] * x.shape[3]:
            # Per view on this rank: sum dy and sum dy * x_hat, by torch's fused batch-norm backward.
            sums = [torch.ops.aten.native_batch_norm_backward(
                        view_dy, view_x, None, None, None, view_mean, view_invstd, True, 0.0, [False, True, True])
                    for view_dy, view_x, view_mean, view_invstd in zip(dy.unbind(), x.unbind(), mean.unbind(),
                                                                        invstd.unbind())]
            payload = torch.stack([column for _, dy_xhat, dy_sum in sums for column in (dy_sum, dy_xhat)])
        else:
            payload = scale.new_zeros(2 * views, channels)
        local_bias, local_weight = payload.view(views, 2, channels).sum(0)  # this rank's, as DDP expects
        dist.all_reduce(payload)                 # the one collective of this layer's backward pass
        grad_input = None
        if ctx.needs_input_grad[0]:
            mean_dy, mean_dy_xhat = (payload.view(views, 2 * channels) / total).split(channels, dim=1)
            x_coefficient = scale * invstd * mean_dy_xhat       # dx = scale dy - c x + (c mean - scale mean_dy)
            constant = torch.addcmul(x_coefficient * mean, scale, mean_dy, value=-1)
            shape = (views, 1, channels, 1)
            grad_input = torch.addcmul(torch.addcmul(constant.view(shape), x, x_coefficient.view(shape), value=-1),
                                       dy, scale.view(shape))
            grad_input = _as(grad_input.view(ctx.input_shape), grad_output.dtype)
        grad_weight = _as(local_weight, ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = _as(local_bias, ctx.weight_dtype) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _dense(tensor: torch.Tensor) -> bool:
    """Whether the batch can be viewed as ``(views, B, C, rest)``: contiguous or channels-last."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    layout = formats.get(tensor.dim())
    return tensor.is_contiguous() or (layout is not None and tensor.is_contiguous(memory_format=layout))


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without an op when it already has that dtype."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def convert_sync_batchnorm(module: nn.Module, device: Optional[torch.device] = None) -> nn.Module:
    """Every ``BatchNorm*d`` of ``module`` made global-batch (:class:`AllReduceBatchNorm`, on any
    device, per-view inside :func:`view_groups`; ``device`` is accepted for older callers and
    unused), with weights, buffers and train/eval mode carried over."""
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
