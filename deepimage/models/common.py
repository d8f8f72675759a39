"""Small helpers shared by the model definitions: width scaling, init and size arithmetic."""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from deepimage.rng import Stream, active_dropout_keys, keyed_normal_rows, unit_uniform

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DEFAULT_DROPOUT = 0.5
"""Dropout ratio of the paper's models (after the first two fully-connected layers)."""


def scale_width(channels: int, width: float) -> int:
    """Scale a channel/unit count by ``width``, rounding to the nearest integer (at least 1)."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(1, int(round(channels * width)))


def resolve_dropout(dropout: float | None) -> float:
    """Return the dropout ratio to use, ``None`` meaning the paper's 0.5; validate the range."""
    p = DEFAULT_DROPOUT if dropout is None else float(dropout)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return p


_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def split_resnet(model: nn.Module, dropout: float = 0.0) -> tuple[nn.Sequential, nn.Sequential]:
    """Split a torchvision-style ResNet into ``features`` (stem..layer4, named as in the
    original so weights keep their names) and ``classifier`` (average pool, flatten, [dropout,]
    fc)."""
    features = nn.Sequential(OrderedDict((n, getattr(model, n)) for n in _TRUNK))
    head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    if dropout > 0:
        head.append(nn.Dropout(dropout))
    head.append(model.fc)
    return features, nn.Sequential(*head)


LINEAR_STD = 0.01
_defer_fc = False


@contextlib.contextmanager
def deferred_fc_init(defer: bool = True) -> Iterator[None]:
    """Within this block, :func:`init_weights` leaves Linear layers that are still on the meta
    device there, keyed but without memory: hybrid parallelism then builds each rank's rows
    alone (:func:`linear_rows`) and no process ever holds a whole FC layer."""
    global _defer_fc
    previous, _defer_fc = _defer_fc, defer
    try:
        yield
    finally:
        _defer_fc = previous


def linear_rows(linear: nn.Linear, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``[lo, hi)`` of ``linear``'s initial weight and bias (on the CPU), the same values
    the whole layer has there; ``linear`` must have passed through :func:`init_linear`."""
    key = getattr(linear, "init_key", None)
    if key is None:
        raise ValueError("this Linear layer has no init key: build it through init_weights")
    weight = keyed_normal_rows(key, lo, hi, linear.in_features, LINEAR_STD)
    bias = torch.zeros(hi - lo) if linear.bias is not None else None
    return weight, bias


def init_linear(m: nn.Linear) -> None:
    """N(0, 0.01) weights and zero biases from a key drawn from torch's global generator,
    row by row (:func:`linear_rows`); a layer on the meta device is moved to the default device
    first, or left there keyed under :func:`deferred_fc_init`."""
    m.init_key = int(torch.randint(0, 2**62, (1,), device="cpu"))  # the one global draw
    if m.weight.is_meta:
        if _defer_fc:
            return
        m.to_empty(device=torch.get_default_device())
        if m.weight.is_meta:  # built under torch.device("meta"): shapes only
            return
    weight, bias = linear_rows(m, 0, m.out_features)
    with torch.no_grad():
        m.weight.copy_(weight)
        if m.bias is not None:
            m.bias.copy_(bias)


def init_weights(module: nn.Module) -> None:
    """torchvision's VGG initialisation: Kaiming-normal (fan_out) convs, N(0, 0.01) linears,
    unit/zero batch-norm, zero biases.

    Convolutions draw from torch's global generator. Each Linear draws one key from it (at
    construction for :func:`fc_head`'s) and its rows come from that key row by row
    (:func:`deepimage.rng.keyed_normal_rows`), so any slice of rows can be built alone with
    exactly the values of the whole layer.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and not hasattr(m, "init_key"):  # fc_head's are done
            init_linear(m)


def fc_head(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Paper-style classifier: Flatten, FC-ReLU-Dropout, FC-ReLU-Dropout, FC.

    ``Flatten`` (not ``view``) keeps the head valid for channels-last inputs; the layer layout
    ``Linear(C*k*k, hidden)`` allows an exact FC-to-conv conversion for dense evaluation.
    The Linear layers are built on the meta device and initialised row by row from one key
    each (:func:`init_linear`); under :func:`deferred_fc_init` they stay there, for hybrid
    parallelism to build each rank's rows alone.
    """
    head = nn.Sequential(
        nn.Flatten(1),
        nn.Linear(in_features, hidden, device="meta"),
        nn.ReLU(inplace=True),
        KeyedDropout(dropout, Stream.DROPOUT_FC1),
        nn.Linear(hidden, hidden, device="meta"),
        nn.ReLU(inplace=True),
        KeyedDropout(dropout, Stream.DROPOUT_FC2),
        nn.Linear(hidden, num_classes, device="meta"),
    )
    for m in head:
        if isinstance(m, nn.Linear):
            init_linear(m)
    return head


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0, ceil: bool = False) -> int:
    """Output length of a convolution/pooling window along one axis (PyTorch's formula).

    With ``ceil`` the last window may overhang the input but must start inside it
    (padded input), exactly as ``nn.MaxPool2d(ceil_mode=True)`` computes it.
    """
    span = size + 2 * padding - kernel
    if span < 0:
        return 0
    out = (math.ceil(span / stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + padding:
        out -= 1
    return out


# --- dropout masks keyed by image, not by process ------------------------------------------


class KeyedDropout(nn.Dropout):
    """``nn.Dropout`` whose masks, inside :func:`deepimage.rng.dropout_keys`, are keyed by image.

    Unit ``j`` of this layer is unit ``first_unit + j`` of the key: a layer that holds a
    slice of the units (hybrid parallelism's sharded head) draws the masks one process draws
    there. Outside that context it is exactly ``nn.Dropout`` (masks from the global RNG).
    """

    def __init__(self, p: float, stream: Stream | int, first_unit: int = 0) -> None:
        super().__init__(p)
        self.stream, self.first_unit = int(stream), int(first_unit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = active_dropout_keys()
        if keys is None or not self.training or self.p == 0:
            return super().forward(x)
        if keys.rows.numel() != x.shape[0]:
            raise ValueError(
                f"dropout keys cover {keys.rows.numel()} images, the batch has {x.shape[0]}"
            )
        u = unit_uniform(keys, self.stream, self.first_unit, x[0].numel(), x.device)
        keep = (u >= self.p).view(x.shape)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


# --- first layers initialised from data ------------------------------------------------------


class WhiteningConv(nn.Conv2d):
    """A ``k x k`` convolution (stride 1, no padding) of ``in_channels`` whose filters whiten
    the ``k x k`` patches of the training images (airbench, arXiv 2404.00498).

    It has ``2 n`` outputs, ``n = in_channels * k * k``: the eigenvectors of the patches'
    second-moment matrix, each divided by ``sqrt(eigenvalue + eps)``, then their negatives
    (so a following GELU keeps both signs). The weights come from :meth:`init_from_data`,
    which the trainer calls once before training on model-ready inputs (it must be the
    model's first layer); the bias starts at zero.
    """

    def __init__(self, in_channels: int = 3, kernel_size: int = 2, eps: float = 5e-4) -> None:
        n = in_channels * kernel_size * kernel_size
        super().__init__(in_channels, 2 * n, kernel_size, padding=0, bias=True)
        self.eps = float(eps)
        with torch.no_grad():
            self.bias.zero_()

    @torch.no_grad()
    def init_from_data(self, batches: Iterable[torch.Tensor]) -> None:
        """Set the filters from batches of ``(B, C, H, W)`` model inputs.

        The moments accumulate in float64 on the inputs' device, and each eigenvector's sign
        is fixed (its largest component positive), so the weights do not depend on the
        batching, the thread count or the linear-algebra library's sign convention.
        """
        c, k = self.in_channels, self.kernel_size[0]
        n = c * k * k
        moment = None
        count = 0
        for x in batches:
            if x.ndim != 4 or x.shape[1] != c:
                raise ValueError(f"whitening expects (B, {c}, H, W) inputs, got {tuple(x.shape)}")
            patches = x.double().unfold(2, k, 1).unfold(3, k, 1)  # (B, C, H', W', k, k)
            flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, n)
            part = flat.T @ flat
            moment = part if moment is None else moment + part
            count += len(flat)
        if moment is None or count == 0:
            raise ValueError("whitening needs at least one image")
        eigval, eigvec = torch.linalg.eigh(moment / count)
        eigval, eigvec = eigval.flip(0), eigvec.flip(1)  # largest variance first
        largest = eigvec.abs().argmax(0)
        eigvec = eigvec * torch.sign(eigvec[largest, torch.arange(n)])[None, :]
        filters = eigvec.T / torch.sqrt(eigval.clamp(min=0) + self.eps)[:, None]
        filters = filters.reshape(n, c, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))
        self.bias.zero_()


def needs_data_init(model: nn.Module) -> bool:
    """Whether ``model`` has layers (:class:`WhiteningConv`) set from training images."""
    return any(isinstance(m, WhiteningConv) for m in model.modules())


def init_from_data(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Initialise ``model``'s data-dependent first layer from batches of model inputs."""
    layers = [m for m in model.modules() if isinstance(m, WhiteningConv)]
    if len(layers) != 1:
        raise ValueError(f"expected one WhiteningConv as the first layer, found {len(layers)}")
    layers[0].init_from_data(batches)
