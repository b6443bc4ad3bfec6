"""BYOL: Bootstrap Your Own Latent (Grill et al. 2020, arXiv 2006.07733), as a small library.

Usable on its own, without Determined::

    learner = BYOL(resnet50(), image_size=256, hidden_layer="avgpool")
    opt = torch.optim.Adam(learner.parameters(), lr=3e-4)
    loss = learner(images)                # augments two views itself
    loss.backward(); opt.step(); opt.zero_grad()
    learner.update_moving_average()       # target <- EMA of online (section 3.1)
    torch.save(resnet.state_dict(), "improved.pt")   # the wrapped network learns in place

or ``learner(view1, view2)`` for views augmented elsewhere (the Determined trial does this, with its
batched on-device augmentations from ``augment.py``).

Section 3.1: the *online* network is encoder f, projector g and predictor q; the *target* network is
encoder and projector only, with weights xi an exponential moving average of the online weights
theta, never trained by gradient. The loss (eq. 2) is the mean squared error of the l2-normalised
prediction and target projection, 2 - 2 cos(q(z1), sg(z'2)), symmetrised over the two views (eq. 4).

Batch-norm statistics are per view, as in the authors' reference code, where each view goes
through the networks on its own: here both views go through each network as ONE batch of 2B (one
pass of the online network, one of the target; convolutions see 2B images at once), and every
batch-norm layer normalises each view with that view's statistics. ``BYOL(net)`` makes the
``nn.BatchNorm*d`` layers of ``net`` per-view capable in place (same modules, parameters and
state_dict; ``batchnorm.per_view_batch_norm``) and ``forward`` groups the batch by view
only for its own two-view pass (``view_groups(2)``), so the loss, every gradient and the running
statistics (updated once per view, view 1 then view 2) are those of separate passes, to float
rounding; elsewhere (evaluation mode, ``return_embedding``, linear evaluation) the layers are plain
batch norm. With synchronised batch norm each view's statistics span that view of the global batch
(``runtime/sync_batchnorm.py``; ``tests/test_byol.py`` compares with separate passes). The
projector's and predictor's output layers have no bias (appendix A); and an optional online linear
classifier on the stopped-gradient representation sg(y) of the first view reports representation
quality during pretraining at little cost (``num_classes``; its loss is returned separately and
trains only it).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from augment import TwoViewAugmentation
from backbone import check_initialisation, initialise_
from batchnorm import per_view_batch_norm, view_groups
from optim import cosine_schedule, same_device_and_dtype


def mlp(in_features: int, hidden_size: int, out_features: int, init: str = "reference") -> nn.Sequential:
    """Projector / predictor MLP of appendix A: Linear, BatchNorm, ReLU, Linear (no bias on the
    output layer, as the reference), initialised as ``init`` says (``backbone.initialise_``:
    the authors' haiku defaults, or torch's)."""
    return initialise_(nn.Sequential(
        nn.Linear(in_features, hidden_size),
        nn.BatchNorm1d(hidden_size),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_size, out_features, bias=False),
    ), init)


def online_classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and top-1 accuracy of the online classifier over the labelled samples of
    the batch (label < 0, e.g. STL-10's unlabeled images, is ignored); tensors, no host sync."""
    labelled = labels >= 0
    count = labelled.sum().clamp(min=1)
    loss = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    correct = (logits.argmax(dim=-1) == labels) & labelled
    return (loss * labelled).sum() / count, correct.sum() / count


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 2 per sample: ||q/||q|| - z'/||z'|| ||^2 = 2 - 2 cos(q, z'). The target gets no gradient."""
    # float32 even under bf16 autocast: the loss is a difference of numbers close to 2.
    prediction = F.normalize(prediction.float(), dim=-1)
    target = F.normalize(target.detach().float(), dim=-1)
    return 2 - 2 * (prediction * target).sum(dim=-1)


def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Section 3.1: xi <- tau * xi + (1 - tau) * theta, for every parameter.

    Buffers (batch-norm running statistics) are copied from the online network: the target network
    is only ever used in training mode, so they never influence the loss, and copying keeps the
    target encoder usable as an evaluation encoder.

    A few multi-tensor launches, not one per tensor, on ATen's fast path on CUDA
    (``check_fast_path_restrictions``, aten/src/ATen/native/ForeachUtils.h): each call gets tensors
    of one device and one dtype (:func:`optim.same_device_and_dtype`: float running statistics and
    int64 ``num_batches_tracked`` go in separate calls, as would a bf16 parameter beside float32
    ones), and each target tensor is paired with its online copy, of the same sizes and strides.
    """
    with torch.no_grad():
        for kind, target_tensors, online_tensors in (
                ("parameter", list(target.parameters()), list(online.parameters())),
                ("buffer", list(target.buffers()), list(online.buffers()))):
            if len(target_tensors) != len(online_tensors):
                raise ValueError(f"target and online networks have different {kind} lists")
            for positions in same_device_and_dtype(target_tensors):
                targets = [target_tensors[i] for i in positions]
                onlines = [online_tensors[i] for i in positions]
                if kind == "parameter":
                    torch._foreach_lerp_(targets, onlines, 1.0 - tau)
                else:
                    torch._foreach_copy_(targets, onlines)


class RepresentationExtractor(nn.Module):
    """Runs any network and returns the flattened output of one of its layers (the representation y).

    ``hidden_layer`` names a submodule (``'avgpool'``) or indexes the network's direct children
    (``-2`` is the layer before the classifier of a torchvision ResNet). ``None`` uses the network's
    own output.
    """

    def __init__(self, net: nn.Module, hidden_layer: Union[str, int, None] = -2):
        super().__init__()
        self.net = net
        self.hidden_layer = hidden_layer
        # A plain attribute, not a registered submodule: the layer already belongs to ``net``.
        object.__setattr__(self, "_layer", self._find_layer(hidden_layer))
        self._captured: Optional[torch.Tensor] = None
        if self._layer is not None:
            self._layer.register_forward_hook(self._capture)

    def _find_layer(self, hidden_layer: Union[str, int, None]) -> Optional[nn.Module]:
        if hidden_layer is None:
            return None
        if isinstance(hidden_layer, int):
            children = list(self.net.children())
            if not -len(children) <= hidden_layer < len(children):
                raise ValueError(
                    f"hidden_layer={hidden_layer} is out of range: the network has {len(children)} "
                    "direct children"
                )
            return children[hidden_layer]
        modules = dict(self.net.named_modules())
        if hidden_layer not in modules:
            names = ", ".join(name for name in modules if name)
            raise ValueError(f"hidden_layer={hidden_layer!r} is not a layer of the network; known: {names}")
        return modules[hidden_layer]

    def _capture(self, _module, _inputs, output):
        self._captured = output

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._layer is None:
            return torch.flatten(self.net(images), 1)
        self._captured = None
        self.net(images)
        if self._captured is None:
            raise RuntimeError(f"hidden layer {self.hidden_layer!r} was never called in forward")
        captured, self._captured = self._captured, None
        return torch.flatten(captured, 1)


class BYOL(nn.Module):
    """Online network (encoder, projector, predictor) plus its EMA target (section 3.1).

    Arguments follow the widely used byol-pytorch interface: ``projection_size`` (256),
    ``projection_hidden_size`` (4096), ``moving_average_decay`` (tau, 0.99 there; the paper's
    tau_base is 0.996 with a cosine schedule, see ``optim.cosine_schedule``), ``augment_fn`` and
    ``augment_fn2`` (batched callables used by ``forward(images)``). ``init`` initialises the
    projector, predictor and online classifier: ``reference`` (the authors': truncated normal
    weights with std parameter 1/sqrt(fan_in), zero biases, ``backbone.reference_init_``) or
    ``torchvision`` (torch's defaults); the encoder ``net`` is used as given (initialise it with
    ``backbone.build_backbone(name, init=...)`` or ``backbone.reference_init_(net)``).
    """

    def __init__(
        self,
        net: nn.Module,
        image_size: int,
        hidden_layer: Union[str, int, None] = -2,
        projection_size: int = 256,
        projection_hidden_size: int = 4096,
        augment_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        augment_fn2: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        moving_average_decay: float = 0.99,
        feature_size: Optional[int] = None,
        channels: int = 3,
        num_classes: int = 0,
        init: str = "reference",
    ):
        super().__init__()
        check_initialisation(init)
        self.net = net
        self.image_size = image_size
        self.moving_average_decay = moving_average_decay
        self.online_encoder = RepresentationExtractor(net, hidden_layer)
        if feature_size is None:
            feature_size = self._probe_feature_size(channels, image_size)
        self.feature_size = feature_size
        self.online_projector = mlp(feature_size, projection_hidden_size, projection_size, init)
        self.online_predictor = mlp(projection_size, projection_hidden_size, projection_size, init)
        # The target starts as a copy of the online encoder and projector (section 3.1); it has no
        # predictor and never receives gradients.
        self.target_encoder = copy.deepcopy(self.online_encoder)
        self.target_projector = copy.deepcopy(self.online_projector)
        for parameter in self.target_parameters():
            parameter.requires_grad_(False)
        self.augment1 = augment_fn
        self.augment2 = augment_fn2 if augment_fn2 is not None else augment_fn
        # Built last, so that the networks above get the same initial weights with or without it.
        self.online_classifier = (initialise_(nn.Linear(feature_size, num_classes), init) if num_classes > 0
                                  else None)
        # Both views in one pass with per-view batch-norm statistics (module docstring).
        per_view_batch_norm(self)

    @torch.no_grad()
    def _probe_feature_size(self, channels: int, image_size: int) -> int:
        was_training = self.net.training
        self.net.eval()
        features = self.online_encoder(torch.zeros(2, channels, image_size, image_size))
        self.net.train(was_training)
        return features.shape[1]

    def online_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters theta trained by the BYOL loss: encoder, projector, predictor."""
        for module in (self.online_encoder, self.online_projector, self.online_predictor):
            yield from module.parameters()

    def target_parameters(self) -> Iterable[nn.Parameter]:
        for module in (self.target_encoder, self.target_projector):
            yield from module.parameters()

    def update_moving_average(self, tau: Optional[float] = None) -> None:
        """xi <- tau xi + (1 - tau) theta (section 3.1); tau defaults to ``moving_average_decay``."""
        tau = self.moving_average_decay if tau is None else tau
        ema_update(self.target_encoder, self.online_encoder, tau)
        ema_update(self.target_projector, self.online_projector, tau)

    def _augment(self, images: torch.Tensor):
        if self.augment1 is None:  # table 6's T and T' as one batch: one crop call, one colour pipeline
            self.augment1 = TwoViewAugmentation(self.image_size).to(images.device)
        if isinstance(self.augment1, TwoViewAugmentation):
            return self.augment1(images)
        return self.augment1(images), self.augment2(images)

    def forward(self, view1: torch.Tensor, view2: Optional[torch.Tensor] = None,
                return_embedding: bool = False, labels: Optional[torch.Tensor] = None):
        """Symmetrised BYOL loss (eq. 4), averaged over the batch.

        ``learner(images)`` augments two views itself; ``learner(view1, view2)`` takes prepared views;
        ``learner(images, return_embedding=True)`` returns the representation y = f(images).
        With ``labels`` (and ``num_classes``) returns ``(byol_loss, classifier_loss, accuracy)``: the
        online classifier on sg(y) of view 1; backpropagate the sum (its gradient reaches only the
        classifier).
        """
        if return_embedding:
            return self.online_encoder(view1)
        if view2 is None:
            view1, view2 = self._augment(view1)
        if view1.shape != view2.shape:
            raise ValueError(f"the two views must have the same shape, got {tuple(view1.shape)} and "
                             f"{tuple(view2.shape)}")
        # One pass of 2B per network; batch-norm statistics per view, as the reference's separate passes.
        views = torch.cat([view1, view2])
        with view_groups(2):
            y = self.online_encoder(views)
            p1, p2 = self.online_predictor(self.online_projector(y)).chunk(2)
            with torch.no_grad():
                t1, t2 = self.target_projector(self.target_encoder(views)).chunk(2)
        loss = (regression_loss(p1, t2) + regression_loss(p2, t1)).mean()
        if labels is None:
            return loss
        if self.online_classifier is None:
            raise ValueError("labels given, but this BYOL has no online classifier (num_classes=0)")
        y1 = y[:view1.shape[0]]
        classifier_loss, accuracy = online_classifier_loss(self.online_classifier(y1.detach()), labels)
        return loss, classifier_loss, accuracy


def train(learner: BYOL, dataloader: Iterable, optimizer: torch.optim.Optimizer, epochs: int,
          device: Union[str, torch.device] = "cpu", log_every: int = 50) -> list[float]:
    """A plain training loop for users with their own DataLoader and no Determined.

    Batches may be image tensors or ``(images, labels)`` tuples, or ``((view1, view2), labels)``.
    The EMA decay follows the cosine schedule of section 3.2 from ``learner.moving_average_decay``.
    Returns the per-step losses.
    """
    learner.to(device).train()
    try:
        steps_per_epoch = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = 0
    total_steps = steps_per_epoch * epochs
    losses: list[float] = []
    step = 0
    for epoch in range(epochs):
        for batch in dataloader:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            if isinstance(batch, (tuple, list)):
                loss = learner(batch[0].to(device), batch[1].to(device))
            else:
                loss = learner(batch.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite BYOL loss {loss.item()} at epoch {epoch}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Section 3.2: tau from tau_base to 1 (optim.cosine_schedule).
            tau = cosine_schedule(step, total_steps, learner.moving_average_decay, 1.0)
            learner.update_moving_average(tau)
            losses.append(loss.item())
            if log_every and step % log_every == 0:
                print(f"epoch {epoch} step {step} loss {losses[-1]:.4f} tau {tau:.5f}", flush=True)
            step += 1
    return losses
