"""Helpers shared by the tests: one `assert_close` that reports where, and poisoned buffers."""

import torch


def assert_equal(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality (NaN equal to NaN), for data movement, sorting, counting and indexing."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point():
        same = (a == e) | (a.isnan() & e.isnan())
    else:
        same = a == e
    if not bool(same.all()):
        bad = (~same).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(
            f"{name}: {bad.shape[0]} of {a.numel()} elements differ; first at {first}: "
            f"{a[first].item()} vs expected {e[first].item()}"
        )


# Relative max-error and RMS-error limits by input dtype, for matmul-like ops accumulated in fp32.
_TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (2e-3, 5e-4), torch.float16: (1e-2, 3e-3), torch.bfloat16: (3e-2, 1e-2)}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype=None) -> None:
    """Max and RMS error relative to the reference's scale; reports the worst element."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert not a.isnan().any() or e.isnan().any(), f"{name}: NaN in result"
    if a.numel() == 0:
        return
    max_tol, rms_tol = _TOL[dtype or actual.dtype]
    scale = e.abs().max().item() or 1.0
    err = (a - e).abs()
    worst = int(err.argmax())
    max_err = err.flatten()[worst].item() / scale
    rms = (err.pow(2).mean().sqrt().item()) / (e.pow(2).mean().sqrt().item() or 1.0)
    if not (max_err <= max_tol and rms <= rms_tol):
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name}: rel max err {max_err:.3e} (tol {max_tol:.0e}) at {where}: "
            f"{a[where].item():.6g} vs {e[where].item():.6g}; rel rms err {rms:.3e} (tol {rms_tol:.0e})"
        )


def poisoned(shape, dtype, device) -> torch.Tensor:
    """A buffer full of NaN (or -1 for integers): anything that reads it unintentionally shows."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)


def assert_grads_in_layout(where: str, params, grads) -> None:
    """Each gradient `torch.autograd.grad` returned has its parameter's shape and strides.

    A gradient in another layout (e.g. the transposed view a product with `w.t()` gives back) is
    copied into the parameter's layout by AccumulateGrad on `.backward()`: a strided pass over the
    whole weight that training pays on every step. `params` is a dict {name: parameter}, `grads`
    the gradients in the same order.
    """
    bad = []
    for (name, p), g in zip(params.items(), grads):
        if g is None:
            bad.append(f"{name}: no gradient")
        elif g.shape != p.shape or g.stride() != p.stride() or not g.is_contiguous():
            bad.append(f"{name}: shape {tuple(g.shape)} strides {g.stride()}, parameter "
                       f"{tuple(p.shape)} strides {p.stride()}")
    assert not bad, f"{where}: gradients not in their parameters' layout: " + "; ".join(bad)
