"""The cross-scale flow: invertibility, exact log-determinant, configuration checks, stored permutation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from FrEIA.framework import GraphINN
from torch import Tensor

from csflow.flow import FlowConfig, build_cs_flow, map_sizes

SIZES = (4, 2, 1)


def tiny_flow(n_features: int = 4, seed: int = 0, perturb: Callable[..., None] | None = None) -> GraphINN:
    torch.manual_seed(seed)
    flow = build_cs_flow(n_features, SIZES, FlowConfig(hidden_channels=8))
    if perturb is not None:
        perturb(flow, scale=0.1, seed=seed)
    return flow


def random_inputs(batch: int, n_features: int, seed: int = 1) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n_features, s, s, generator=generator) for s in SIZES]


def flat_jacobian(flow: GraphINN, inputs: list[Tensor]) -> Tensor:
    """Dense Jacobian of the concatenated flattened outputs w.r.t. the concatenated flattened inputs of
    a single sample (batch of 1)."""
    shapes = [x.shape for x in inputs]
    numels = [x.numel() for x in inputs]

    def fn(v: Tensor) -> Tensor:
        parts = [p.view(shape) for p, shape in zip(torch.split(v, numels), shapes, strict=True)]
        z, _ = flow(parts)
        return torch.cat([zi.flatten() for zi in z])

    v = torch.cat([x.flatten() for x in inputs])
    return torch.autograd.functional.jacobian(fn, v)


@pytest.mark.parametrize("n_features", [4, 5])
def test_reverse_reconstructs_input_and_negates_log_det(perturb: Callable[..., None], n_features: int) -> None:
    flow = tiny_flow(n_features, perturb=perturb)
    x = random_inputs(3, n_features)
    with torch.no_grad():
        z, jac = flow(x)
        x_rec, jac_rev = flow(list(z), rev=True)
    assert [zi.shape for zi in z] == [xi.shape for xi in x]
    assert jac.shape == (3,)
    assert not torch.allclose(jac, torch.zeros_like(jac)), "perturbed flow should not be volume-preserving"
    for xi, ri in zip(x, x_rec, strict=True):
        torch.testing.assert_close(ri, xi, atol=1e-4, rtol=0)
    torch.testing.assert_close(jac_rev, -jac, atol=1e-4, rtol=1e-5)


def set_gammas(flow: GraphINN, value: float) -> None:
    """Open every coupling: the gammas scale each scale's whole subnet output, so at 0 nothing moves."""
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if "gamma" in name:
                p.fill_(value)


def test_log_det_matches_brute_force_jacobian(perturb: Callable[..., None]) -> None:
    flow = tiny_flow(perturb=perturb)
    set_gammas(flow, 1.0)  # clearly non-zero, so scales, shifts and cross-scale paths all act
    flow = flow.double()
    x = [xi.double() for xi in random_inputs(1, 4)]
    jacobian = flat_jacobian(flow, x)
    assert jacobian.shape == (84, 84)  # 4 channels * (16 + 4 + 1) positions
    sign, logabsdet = torch.linalg.slogdet(jacobian)
    assert sign != 0
    with torch.no_grad():
        _, log_jac_det = flow(x)
    assert log_jac_det.abs().item() > 0.1, "the check needs a flow far from volume-preserving"
    torch.testing.assert_close(log_jac_det[0], logabsdet, atol=1e-8, rtol=1e-8)


def composed_permutation(flow: GraphINN, scale: int) -> Tensor:
    """The channel order a flow of bare permutations would produce at `scale`."""
    order = torch.arange(flow.state_dict()[f"module_list.0.perm{scale}"].numel())
    for key, perm in flow.state_dict().items():
        if key.endswith(f".perm{scale}"):
            order = order[perm]
    return order


def test_fresh_flow_is_a_pure_permutation_with_zero_log_det() -> None:
    """The original's gammas multiply each destination scale's whole subnet output and start at 0, so
    every fresh coupling is the identity: z is x with its channels permuted, bit for bit, log-det 0."""
    flow = tiny_flow(n_features=6)
    x = [xi * 5 for xi in random_inputs(3, 6)]  # large inputs: any leak through s or t would show
    with torch.no_grad():
        z, log_jac_det = flow(x)
    assert torch.equal(log_jac_det, torch.zeros(3))
    for scale, (xi, zi) in enumerate(zip(x, z, strict=True)):
        order = composed_permutation(flow, scale)
        assert not torch.equal(order, torch.arange(6)), "the permutations must be non-trivial for this test"
        assert torch.equal(zi, xi[:, order]), scale


def test_one_gamma_per_destination_scale_gates_that_scale_only() -> None:
    """Opening gamma1 alone changes only scale 1's outputs of each coupling, including its cross paths."""
    flow = tiny_flow()
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if name.endswith("gamma1"):
                p.fill_(1.0)
        x = random_inputs(2, 4)
        z, log_jac_det = flow(x)
    for scale in (0, 2):
        assert torch.equal(z[scale], x[scale][:, composed_permutation(flow, scale)]), scale
    assert not torch.equal(z[1], x[1][:, composed_permutation(flow, 1)])
    assert torch.all(log_jac_det != 0)


def test_log_det_is_per_sample(perturb: Callable[..., None]) -> None:
    flow = tiny_flow(perturb=perturb)
    x = random_inputs(2, 4)
    with torch.no_grad():
        _, jac_pair = flow(x)
        _, jac_first = flow([xi[:1] for xi in x])
        _, jac_second = flow([xi[1:] for xi in x])
    torch.testing.assert_close(jac_pair, torch.cat([jac_first, jac_second]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(jac_pair[0], jac_pair[1])


def test_scales_start_independent_and_interact_once_gammas_move(perturb: Callable[..., None]) -> None:
    """Gammas start at zero, so scale 0's output ignores scale 2; nonzero gammas connect them."""
    fresh = tiny_flow().double()
    for name, p in fresh.named_parameters():
        if "gamma" in name:
            assert torch.all(p == 0), name
    x = [xi.double() for xi in random_inputs(1, 4)]
    coarse_to_fine = slice(0, 4 * 16), slice(4 * 20, 4 * 21)  # rows: scale 0 outputs; cols: scale 2 inputs
    block = flat_jacobian(fresh, x)[coarse_to_fine]
    assert torch.count_nonzero(block) == 0

    perturb(fresh, scale=0.1, seed=0)
    block = flat_jacobian(fresh, x)[coarse_to_fine]
    assert block.abs().max() > 1e-6


def test_permutations_are_stored_buffers_and_used() -> None:
    flow = tiny_flow()
    state = flow.state_dict()
    perm_keys = sorted(k for k in state if "perm" in k)
    assert len(perm_keys) == 4 * 3 * 2  # blocks x scales x (perm, inverse)
    for key in perm_keys:
        perm = state[key]
        assert sorted(perm.tolist()) == list(range(4)), key
        if ".perm_inv" not in key:
            inverse = state[key.replace(".perm", ".perm_inv")]
            assert torch.equal(perm[inverse], torch.arange(4))

    x = random_inputs(2, 4)
    with torch.no_grad():
        z_before, _ = flow(x)
    key = next(k for k in perm_keys if k.endswith(".perm0"))
    changed = dict(state)
    flipped = torch.flip(state[key], dims=[0])
    changed[key] = flipped
    changed[key.replace(".perm0", ".perm_inv0")] = torch.argsort(flipped)
    flow.load_state_dict(changed)
    with torch.no_grad():
        z_after, _ = flow(x)
        x_rec, _ = flow(list(z_after), rev=True)
    assert not torch.allclose(z_before[0], z_after[0])
    for xi, ri in zip(x, x_rec, strict=True):
        torch.testing.assert_close(ri, xi, atol=1e-4, rtol=0)


def test_same_config_builds_same_permutations() -> None:
    a = {k: v for k, v in tiny_flow(seed=0).state_dict().items() if "perm" in k}
    b = {k: v for k, v in tiny_flow(seed=123).state_dict().items() if "perm" in k}
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("size", "expected"), [(128, (4, 2, 1)), (256, (8, 4, 2)), (768, (24, 12, 6))])
def test_map_sizes(size: int, expected: tuple[int, int, int]) -> None:
    assert map_sizes(size) == expected


@pytest.mark.parametrize("size", [0, -128, 64, 100, 192, 300])
def test_map_sizes_rejects_non_multiples_of_128(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 128"):
        map_sizes(size)


def test_flow_config_defaults_are_the_originals() -> None:
    cfg = FlowConfig()
    original = (1024, 4, (3, 3, 3, 5), 3.0, 0.1)
    assert (
        cfg.hidden_channels,
        cfg.n_blocks,
        tuple(cfg.kernel_sizes),
        cfg.clamp,
        cfg.leaky_slope,
    ) == original


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_sizes": (3, 3, 3)}, "n_blocks"),
        ({"n_blocks": 2}, "n_blocks"),
        ({"kernel_sizes": (3, 3, 4, 5)}, "odd"),
        ({"kernel_sizes": (3, 3, 3, 0)}, "odd"),
        ({"hidden_channels": 0}, "hidden_channels"),
        ({"clamp": 0.0}, "clamp"),
    ],
)
def test_flow_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlowConfig(**kwargs)


def test_build_rejects_wrong_number_of_scales() -> None:
    with pytest.raises(ValueError, match="3 scales"):
        build_cs_flow(4, (4, 2), FlowConfig(hidden_channels=8))


def test_odd_kernel_sizes_keep_spatial_sizes() -> None:
    flow = build_cs_flow(4, (8, 4, 2), FlowConfig(hidden_channels=4, n_blocks=2, kernel_sizes=(1, 5)))
    x = [torch.randn(2, 4, s, s) for s in (8, 4, 2)]
    with torch.no_grad():
        z, _ = flow(x)
    assert [zi.shape for zi in z] == [xi.shape for xi in x]
