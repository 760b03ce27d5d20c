"""The cross-scale normalizing flow of CS-Flow (Rudolph et al., WACV 2022), built on FrEIA.

Four blocks of (fixed channel permutation, parallel affine coupling on both channel halves). The
coupling subnets are cross-scale convolutions, so each scale's transform sees its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from FrEIA.framework import GraphINN, InputNode, Node, OutputNode
from FrEIA.modules import InvertibleModule
from torch import Tensor, nn

from csflow.flow_config import FlowConfig

N_SCALES = 3
# Revision of the flow's arithmetic, recorded in every model manifest; weights trained under another
# revision compute something else and must not be loaded. 1: gammas on the cross paths per source
# scale; 2: gammas on each destination scale's whole subnet output, as the original.
FLOW_REVISION = 2
ATAN_SCALE = 0.636  # ~2/pi: keeps the soft clamp's slope at 1 near zero, as in the original


class CrossConvolutions(nn.Module):
    """Subnet of one coupling: per-scale conv-LeakyReLU-conv plus paths from the neighbouring scales.

    The coarser scale reaches a finer one through bilinear upsampling + conv, the finer one reaches a
    coarser one through a stride-2 conv. As in the original, the terms reaching a scale are summed and
    the sum is multiplied by that destination scale's learnable gamma, which starts at zero: a fresh
    coupling outputs s = t = 0, so a fresh flow is a pure permutation (log-det 0) and training starts
    from the identity instead of from random affine transforms.
    """

    def __init__(self, in_chs: int, out_chs: int, hidden_chs: int, kernel_size: int, leaky_slope: float) -> None:
        super().__init__()
        pad = kernel_size // 2

        def conv(i: int, o: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(i, o, kernel_size, stride=stride, padding=pad)

        self.conv_in = nn.ModuleList(conv(in_chs, hidden_chs) for _ in range(N_SCALES))
        self.conv_out = nn.ModuleList(conv(hidden_chs, out_chs) for _ in range(N_SCALES))
        self.up_conv10 = conv(hidden_chs, out_chs)
        self.up_conv21 = conv(hidden_chs, out_chs)
        self.down_conv01 = conv(hidden_chs, out_chs, stride=2)
        self.down_conv12 = conv(hidden_chs, out_chs, stride=2)
        # One gamma per destination scale, multiplying that scale's whole output (the original's).
        self.gamma0 = nn.Parameter(torch.zeros(1))
        self.gamma1 = nn.Parameter(torch.zeros(1))
        self.gamma2 = nn.Parameter(torch.zeros(1))
        self.act = nn.LeakyReLU(leaky_slope)

    def forward(self, x0: Tensor, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h0, h1, h2 = (self.act(conv(x)) for conv, x in zip(self.conv_in, (x0, x1, x2), strict=True))
        y0, y1, y2 = (conv(h) for conv, h in zip(self.conv_out, (h0, h1, h2), strict=True))
        up10 = self.up_conv10(_upsample2x(h1))
        up21 = self.up_conv21(_upsample2x(h2))
        down01 = self.down_conv01(h0)
        down12 = self.down_conv12(h1)
        return (
            (y0 + up10) * self.gamma0,
            (y1 + down01 + up21) * self.gamma1,
            (y2 + down12) * self.gamma2,
        )


def _upsample2x(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class ParallelPermute(InvertibleModule):
    """A fixed random channel permutation of each scale; stored as buffers so artifacts carry it."""

    def __init__(self, dims_in: Sequence[tuple[int, ...]], seed: int) -> None:
        super().__init__(dims_in)
        generator = torch.Generator().manual_seed(seed)
        for i, dims in enumerate(dims_in):
            perm = torch.randperm(dims[0], generator=generator)
            self.register_buffer(f"perm{i}", perm)
            self.register_buffer(f"perm_inv{i}", torch.argsort(perm))

    def forward(
        self, x: Sequence[Tensor], c: object = None, rev: bool = False, jac: bool = True
    ) -> tuple[tuple[Tensor, ...], float]:
        name = "perm_inv" if rev else "perm"
        return tuple(xi[:, getattr(self, f"{name}{i}")] for i, xi in enumerate(x)), 0.0

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return input_dims


class ParallelAffineCoupling(InvertibleModule):
    """Affine coupling applied to all scales at once, both channel halves in turn.

    Notation: x = [a, b] split along channels; (s_a, t_a) = F_b(b) transforms a, then
    (s_b, t_b) = F_a(y_a) transforms b. y = exp(e(s)) * x + t with the soft clamp
    e(s) = clamp * 0.636 * atan(s / clamp); log|det J| = sum of e(s) over both halves and scales.
    """

    def __init__(
        self,
        dims_in: Sequence[tuple[int, ...]],
        hidden_chs: int,
        kernel_size: int,
        clamp: float,
        leaky_slope: float,
    ) -> None:
        super().__init__(dims_in)
        channels = dims_in[0][0]
        if any(d[0] != channels for d in dims_in):
            raise ValueError(f"all scales must have the same channel count, got {dims_in}")
        self.len_a = channels // 2
        self.len_b = channels - self.len_a
        self.clamp = clamp
        self.subnet_a = CrossConvolutions(self.len_a, 2 * self.len_b, hidden_chs, kernel_size, leaky_slope)
        self.subnet_b = CrossConvolutions(self.len_b, 2 * self.len_a, hidden_chs, kernel_size, leaky_slope)

    def _log_scale(self, s: Tensor) -> Tensor:
        return self.clamp * ATAN_SCALE * torch.atan(s / self.clamp)

    def _split_params(self, r: Tensor, n: int) -> tuple[Tensor, Tensor]:
        return self._log_scale(r[:, :n]), r[:, n:]

    def forward(
        self, x: Sequence[Tensor], c: object = None, rev: bool = False, jac: bool = True
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        a = [xi[:, : self.len_a] for xi in x]
        b = [xi[:, self.len_a :] for xi in x]
        log_det = x[0].new_zeros(x[0].shape[0])
        if not rev:
            params_a = [self._split_params(r, self.len_a) for r in self.subnet_b(*b)]
            a = [torch.exp(s) * ai + t for ai, (s, t) in zip(a, params_a, strict=True)]
            params_b = [self._split_params(r, self.len_b) for r in self.subnet_a(*a)]
            b = [torch.exp(s) * bi + t for bi, (s, t) in zip(b, params_b, strict=True)]
        else:
            params_b = [self._split_params(r, self.len_b) for r in self.subnet_a(*a)]
            b = [(bi - t) * torch.exp(-s) for bi, (s, t) in zip(b, params_b, strict=True)]
            params_a = [self._split_params(r, self.len_a) for r in self.subnet_b(*b)]
            a = [(ai - t) * torch.exp(-s) for ai, (s, t) in zip(a, params_a, strict=True)]
        for s, _ in (*params_a, *params_b):
            log_det = log_det + s.sum(dim=(1, 2, 3))
        out = tuple(torch.cat((ai, bi), dim=1) for ai, bi in zip(a, b, strict=True))
        return out, -log_det if rev else log_det

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return input_dims


def map_sizes(image_size: int) -> tuple[int, int, int]:
    """Feature-map side lengths of the three scales for an input of `image_size` pixels."""
    if image_size <= 0 or image_size % 128:
        raise ValueError(f"image_size must be a positive multiple of 128, got {image_size}")
    return image_size // 32, image_size // 64, image_size // 128


def build_cs_flow(n_features: int, sizes: Sequence[int], config: FlowConfig) -> GraphINN:
    """The CS-Flow graph for `n_features`-channel maps of side lengths `sizes` (one per scale)."""
    if len(sizes) != N_SCALES:
        raise ValueError(f"CS-Flow needs {N_SCALES} scales, got sizes {list(sizes)}")
    inputs = [InputNode(n_features, s, s, name=f"input{i}") for i, s in enumerate(sizes)]
    nodes: list[Node] = list(inputs)
    previous = [node.out0 for node in inputs]
    for k in range(config.n_blocks):
        permute = Node(previous, ParallelPermute, {"seed": k}, name=f"permute{k}")
        coupling = Node(
            [permute.out0, permute.out1, permute.out2],
            ParallelAffineCoupling,
            {
                "hidden_chs": config.hidden_channels,
                "kernel_size": config.kernel_sizes[k],
                "clamp": config.clamp,
                "leaky_slope": config.leaky_slope,
            },
            name=f"coupling{k}",
        )
        nodes += [permute, coupling]
        previous = [coupling.out0, coupling.out1, coupling.out2]
    nodes += [OutputNode(p, name=f"output{i}") for i, p in enumerate(previous)]
    return GraphINN(nodes)
