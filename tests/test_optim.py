"""MainWeightsAdamW: against torch.optim.AdamW (fp32 params), against the fp32 reference update
(fp16/bf16 params), gradient clipping and scaling, state_dict round trips, hostile shapes.

torch.optim.AdamW and the kernel take the same steps in fp32 but not always the same roundings
(torch's CPU square root is not correctly rounded, its addcdiv groups the product differently), so
those comparisons use the fp32 limits of `assert_close`. Against `adamw_step_reference`, which
performs the kernel's operations in the kernel's order, the moments are compared bitwise and the
main weights with the fp32 limits (the square root again); a low-precision parameter must equal its
main weights rounded to its dtype, bitwise.
"""

import copy
import io
import math

import pytest
import torch

from megablocks.backend.optim import adamw_multi_step, adamw_step, adamw_step_reference
from megablocks.optim import MainWeightsAdamW
from tests.conftest import DEVICE, FLOAT_DTYPES
from tests.utils import assert_close, assert_equal

# Sizes that do not divide the 1024-element block, one that does, single elements, a 0-d
# parameter and empty ones.
SHAPES = [(33, 70), (1025,), (1024,), (1,), (), (0,), (0, 5), (3, 341)]

# bf16 arithmetic and bf16 rounding are broken in Triton's interpreter (its fp32 -> bf16
# conversion truncates), so bf16 is checked bitwise on GPU only; see tests/conftest.py.
LOW_DTYPES = [d for d in FLOAT_DTYPES if d != torch.float32]


def _params(shapes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype=dtype, device=device)) for s in shapes]


def _grads(shapes, dtype, device, steps, scale=1.0, seed=1):
    """grads[t][i]: the gradient of parameter i at step t (fresh, seeded, never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    return [[(scale * torch.randn(s, generator=gen)).to(dtype=dtype, device=device) for s in shapes]
            for _ in range(steps)]


def _set_grads(params, grads, skip=()):
    for i, (p, g) in enumerate(zip(params, grads)):
        p.grad = None if i in skip else g.clone()


def _groups(params, split):
    """Two param groups with their own lr, betas, eps and weight decay."""
    return [
        dict(params=params[:split], lr=1e-2, weight_decay=0.1),
        dict(params=params[split:], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0),
    ]


def _check_state(where, opt, params, ref_opt, ref_params):
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_close(f"{where}: param {i}", p, q)
        mine, ref = opt.state[p], ref_opt.state[q]
        assert ("main" in mine) == ("exp_avg" in ref), f"{where}: param {i}: state presence differs"
        if "main" in mine:
            assert mine["step"].item() == ref["step"].item(), f"{where}: param {i}: step counts differ"
            assert_close(f"{where}: main {i}", mine["main"], q)
            assert_close(f"{where}: exp_avg {i}", mine["exp_avg"], ref["exp_avg"])
            assert_close(f"{where}: exp_avg_sq {i}", mine["exp_avg_sq"], ref["exp_avg_sq"])


# 'reference' runs the optimizer's plain-torch path (what CPU tensors take without the interpreter).
PATHS = ["kernel", "reference"] if DEVICE == "cpu" else ["kernel"]


@pytest.mark.parametrize("path", PATHS)
def test_matches_torch_adamw_fp32(path, monkeypatch):
    if path == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    shapes = SHAPES
    params = _params(shapes, torch.float32, DEVICE)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = MainWeightsAdamW(_groups(params, 4))
    ref_opt = torch.optim.AdamW(_groups(ref_params, 4))
    # Some parameters without a gradient in some steps (one of them in its first step).
    skips = [{2}, {0, 5}, set(), {1, 2, 3}, set()]
    for t, grads in enumerate(_grads(shapes, torch.float32, DEVICE, len(skips))):
        _set_grads(params, grads, skips[t])
        _set_grads(ref_params, grads, skips[t])
        opt.step()
        ref_opt.step()
        _check_state(f"step {t + 1}", opt, params, ref_opt, ref_params)
    for p in params:  # fp32 contiguous parameters are their own main weights, no copy
        assert opt.state[p]["main"].data_ptr() == p.data_ptr()


def _reference_run(params, grads_per_step, groups_split, scales=None):
    """fp32 main weights and moments from `adamw_step_reference`, the same grads, steps and
    hyperparameters as `_groups`; returns [(main, exp_avg, exp_avg_sq)] per parameter."""
    hyper = [dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1),
             dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.0)]
    states = [(p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True), torch.zeros(p.shape, device=p.device),
               torch.zeros(p.shape, device=p.device)) for p in params]
    for t, grads in enumerate(grads_per_step):
        for i, (g, (main, m, v)) in enumerate(zip(grads, states)):
            h = hyper[0] if i < groups_split else hyper[1]
            scale = None if scales is None else scales[t]
            adamw_step_reference(None, g, main, m, v, step=t + 1, grad_scale=scale, **h)
    return states


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_low_precision_params_follow_fp32_reference(dtype):
    shapes = SHAPES
    params = _params(shapes, dtype, DEVICE)
    opt = MainWeightsAdamW(_groups(params, 4))
    grads = _grads(shapes, dtype, DEVICE, 3)
    expected = _reference_run(params, grads, 4)
    for g in grads:
        _set_grads(params, g)
        opt.step()
    for i, (p, (main, m, v)) in enumerate(zip(params, expected)):
        state = opt.state[p]
        assert state["main"].dtype == torch.float32
        assert_equal(f"exp_avg {i}", state["exp_avg"], m)
        assert_equal(f"exp_avg_sq {i}", state["exp_avg_sq"], v)
        assert_close(f"main {i}", state["main"], main)
        assert_equal(f"param {i}", p.detach(), state["main"].to(dtype))
        if p.numel():  # the update moved the parameter (main is not just its initial value)
            assert not torch.equal(state["main"], _params(shapes, dtype, DEVICE)[i].float())


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_fp32_grads_of_low_precision_params(dtype):
    if not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("this torch has no Tensor.grad_dtype: a gradient must have its parameter's dtype")
    shapes = [(1025,), (3, 341), ()]
    params = _params(shapes, dtype, DEVICE)
    for p in params:
        p.grad_dtype = torch.float32
    opt = MainWeightsAdamW(params, lr=1e-2, weight_decay=0.1)
    grads = _grads(shapes, torch.float32, DEVICE, 2)
    expected = _reference_run(params, grads, len(shapes))
    for g in grads:
        _set_grads(params, g)
        opt.step()
    for i, (p, (main, m, v)) in enumerate(zip(params, expected)):
        assert p.grad.dtype == torch.float32
        assert_equal(f"exp_avg {i}", opt.state[p]["exp_avg"], m)
        assert_equal(f"exp_avg_sq {i}", opt.state[p]["exp_avg_sq"], v)
        assert_close(f"main {i}", opt.state[p]["main"], main)
        assert_equal(f"param {i}", p.detach(), opt.state[p]["main"].to(dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_non_contiguous_params_and_grads(dtype):
    # A transposed parameter, and one that views every other column of a larger tensor: the
    # columns it skips must stay as they were.
    base = torch.randn(7, 9).to(dtype=dtype, device=DEVICE)
    base_before = base.clone()
    params = [torch.nn.Parameter(torch.randn(40, 30).to(dtype=dtype, device=DEVICE).t()),
              torch.nn.Parameter(base[:, ::2])]
    assert not any(p.is_contiguous() for p in params) and params[1].data_ptr() == base.data_ptr()
    opt = MainWeightsAdamW(params, lr=1e-2, weight_decay=0.1)
    grads = [[torch.randn(40, 30).to(dtype=dtype, device=DEVICE).t(), torch.randn(7, 5).to(dtype=dtype, device=DEVICE)]
             for _ in range(2)]
    expected = _reference_run(params, grads, 2)
    for g in grads:
        _set_grads(params, g)
        opt.step()
    for i, (p, (main, m, v)) in enumerate(zip(params, expected)):
        assert_equal(f"exp_avg {i}", opt.state[p]["exp_avg"], m)
        assert_close(f"main {i}", opt.state[p]["main"], main)
        assert_equal(f"param {i}", p.detach(), opt.state[p]["main"].to(dtype))
    assert_equal("columns the view skips", base[:, 1::2], base_before[:, 1::2])
    assert not torch.equal(base[:, ::2], base_before[:, ::2])


def test_grad_scale_matches_scaled_grads():
    shapes = [(33, 70), (1025,), ()]
    params = _params(shapes, torch.float32, DEVICE)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = MainWeightsAdamW(params, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2)
    for t, grads in enumerate(_grads(shapes, torch.float32, DEVICE, 3)):
        scale = torch.tensor(0.25 * (t + 1), device=DEVICE)
        _set_grads(params, grads)
        _set_grads(ref_params, [g * scale for g in grads])
        opt.step(grad_scale=scale)
        ref_opt.step()
        _check_state(f"step {t + 1}", opt, params, ref_opt, ref_params)
        assert_equal("grad left as it was", params[0].grad, grads[0])


@pytest.mark.parametrize("max_norm", [1.0, 1e4, math.inf])
def test_clip_grad_norm_matches_torch(max_norm):
    shapes = [(33, 70), (1025,), (), (0,)]
    params = _params(shapes, torch.float32, DEVICE)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = MainWeightsAdamW(_groups(params, 2))
    ref_opt = torch.optim.AdamW(_groups(ref_params, 2))
    for t, grads in enumerate(_grads(shapes, torch.float32, DEVICE, 3, scale=3.0)):
        _set_grads(params, grads)
        _set_grads(ref_params, grads)
        norm = opt.clip_grad_norm_(max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
        assert norm.dtype == torch.float32 and norm.shape == () and norm.device == params[0].device
        assert_close(f"step {t + 1}: norm", norm, ref_norm)
        opt.step()
        ref_opt.step()
        _check_state(f"step {t + 1}", opt, params, ref_opt, ref_params)
    # The coefficient is used up by the step: the next one does not clip.
    _set_grads(params, grads)
    _set_grads(ref_params, grads)
    opt.step()
    ref_opt.step()
    _check_state("unclipped step", opt, params, ref_opt, ref_params)


def test_clip_grad_norm_of_low_precision_grads_is_fp32():
    dtype = LOW_DTYPES[0]
    shapes = [(33, 70), (1025,), ()]
    params = _params(shapes, dtype, DEVICE)
    grads = _grads(shapes, dtype, DEVICE, 1, scale=30.0)[0]  # squares overflow fp16's range
    _set_grads(params, grads)
    opt = MainWeightsAdamW(params, lr=1e-2, weight_decay=0.1)  # _reference_run's first group
    norm = opt.clip_grad_norm_(1.0)
    fp32_copies = [torch.nn.Parameter(g.float()) for g in grads]
    for p, g in zip(fp32_copies, grads):
        p.grad = g.float()
    ref_norm = torch.nn.utils.clip_grad_norm_(fp32_copies, 1.0)
    assert norm.dtype == torch.float32
    assert_close("norm", norm, ref_norm)
    # The step applies the coefficient: the same update as the fp32 reference from scaled grads.
    coef = torch.clamp(1.0 / (ref_norm + 1e-6), max=1.0)
    expected = _reference_run(params, [grads], len(shapes), scales=[coef])
    opt.step()
    for i, (p, (main, m, v)) in enumerate(zip(params, expected)):
        assert_close(f"main {i}", opt.state[p]["main"], main)
        assert_close(f"exp_avg {i}", opt.state[p]["exp_avg"], m)


def test_clip_then_grad_scale_multiply():
    shapes = [(1025,), (3, 341)]
    params = _params(shapes, torch.float32, DEVICE)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = MainWeightsAdamW(params)
    ref_opt = torch.optim.AdamW(ref_params)
    grads = _grads(shapes, torch.float32, DEVICE, 1, scale=3.0)[0]
    _set_grads(params, grads)
    _set_grads(ref_params, grads)
    scale = torch.tensor(0.5, device=DEVICE)
    coef = torch.clamp(1.0 / (opt.clip_grad_norm_(1.0) + 1e-6), max=1.0)
    opt.step(grad_scale=scale)
    for p in ref_params:
        p.grad.mul_(coef * scale)
    ref_opt.step()
    _check_state("clip and scale", opt, params, ref_opt, ref_params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_state_dict_round_trip(dtype):
    shapes = SHAPES
    grads = _grads(shapes, dtype, DEVICE, 5)
    params = _params(shapes, dtype, DEVICE)
    opt = MainWeightsAdamW(_groups(params, 4))
    for t, g in enumerate(grads):
        _set_grads(params, g, skip={1} if t == 0 else ())
        opt.step()

    first = _params(shapes, dtype, DEVICE)
    opt_a = MainWeightsAdamW(_groups(first, 4))
    for t, g in enumerate(grads[:3]):
        _set_grads(first, g, skip={1} if t == 0 else ())
        opt_a.step()
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    fresh = _params(shapes, dtype, DEVICE, seed=7)  # other values: the loaded main weights decide
    opt_b = MainWeightsAdamW(_groups(fresh, 4))
    opt_b.load_state_dict(saved)
    for i, (p, q) in enumerate(zip(fresh, first)):
        for k in ("main", "exp_avg", "exp_avg_sq"):
            assert opt_b.state[p][k].dtype == torch.float32, f"param {i}: {k} not fp32 after loading"
            assert_equal(f"loaded {k} {i}", opt_b.state[p][k], opt_a.state[q][k])
        assert_equal(f"param {i} set from its main weights", p.detach(), opt_b.state[p]["main"].to(dtype))
    for g in grads[3:]:
        _set_grads(fresh, g)
        opt_b.step()
    for i, (p, q) in enumerate(zip(fresh, params)):
        assert_equal(f"param {i}", p.detach(), q.detach())
        assert opt_b.state[p]["step"].item() == opt.state[q]["step"].item() == (4 if i == 1 else 5)
        for k in ("main", "exp_avg", "exp_avg_sq"):
            assert_equal(f"{k} {i}", opt_b.state[p][k], opt.state[q][k])
    if dtype == torch.float32:
        assert all(opt_b.state[p]["main"].data_ptr() == p.data_ptr() for p in fresh)
    # The loaded optimizer does not share tensors with the dict it was loaded from.
    assert saved["state"][0]["step"].item() == 3


def test_state_dict_lr_per_group_round_trip():
    params = _params([(5,)] * 2, torch.float16, DEVICE)
    opt = MainWeightsAdamW(_groups(params, 1))
    opt.param_groups[0]["lr"] = 0.5
    other = MainWeightsAdamW(_groups(_params([(5,)] * 2, torch.float16, DEVICE), 1))
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [g["lr"] for g in other.param_groups] == [0.5, 3e-3]
    assert other.param_groups[1]["betas"] == (0.8, 0.99)


def test_empty_and_scalar_params_step():
    params = _params([(0,), (), (0, 3)], FLOAT_DTYPES[-1], DEVICE)
    opt = MainWeightsAdamW(params)
    for _ in range(2):
        _set_grads(params, [torch.randn(p.shape).to(dtype=p.dtype, device=p.device) for p in params])
        opt.step()
    assert all(opt.state[p]["step"].item() == 2 for p in params)
    # The fp32 main weight moved (two steps of lr 1e-3 may round back to the same bf16 value).
    start = _params([(0,), (), (0, 3)], FLOAT_DTYPES[-1], DEVICE)[1].float()
    assert opt.state[params[1]]["main"].float() != start


def test_closure_returns_loss():
    p = torch.nn.Parameter(torch.randn(4, device=DEVICE))
    opt = MainWeightsAdamW([p])

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.state[p]["step"].item() == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(eps=-1.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(betas=(0.9,)), "betas"),
        (dict(lr=float("nan")), "lr"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, name):
    p = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    with pytest.raises(ValueError, match=name):
        MainWeightsAdamW([p], **kwargs)
    opt = MainWeightsAdamW([p])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.randn(2, device=DEVICE))], **kwargs))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64], ids=str)
def test_bad_param_dtype_raises_type_error(dtype):
    p = torch.zeros(3, dtype=dtype, device=DEVICE)
    with pytest.raises(TypeError, match="params"):
        MainWeightsAdamW([p])


def test_bad_grad_scale_and_max_norm():
    p = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    p.grad = torch.randn(3, device=DEVICE)
    opt = MainWeightsAdamW([p])
    with pytest.raises(TypeError, match="grad_scale"):
        opt.step(grad_scale=torch.tensor(1.0, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(grad_scale=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="max_norm"):
        opt.clip_grad_norm_(0.0)
    # A bad gradient anywhere refuses the whole step before any parameter moves.
    q = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    q.grad_dtype = None  # let the gradient's dtype differ from the parameter's
    q.grad = torch.randn(3, device=DEVICE).to(torch.float64)
    opt.add_param_group(dict(params=[q]))
    before = p.detach().clone()
    with pytest.raises(TypeError, match="grad"):
        opt.step()
    assert not opt.state[p] and not opt.state[q], "a refused step must not have changed the state"
    assert_equal("param after a refused step", p.detach(), before)


def test_launcher_checks():
    g = torch.randn(5, device=DEVICE)
    main, m, v = torch.randn(5, device=DEVICE), torch.zeros(5, device=DEVICE), torch.zeros(5, device=DEVICE)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(TypeError, match="main"):
        adamw_step(None, g, main.half(), m, v, step=1, **hyper)
    with pytest.raises(ValueError, match="exp_avg"):
        adamw_step(None, g, main, torch.zeros(6, device=DEVICE), v, step=1, **hyper)
    with pytest.raises(ValueError, match="step"):
        adamw_step(None, g, main, m, v, step=0, **hyper)
    with pytest.raises(TypeError, match="grad"):
        adamw_step(None, g.to(torch.int32), main, m, v, step=1, **hyper)


def test_accumulate_grads_in_fp32():
    """Micro-batch gradients of fp16 parameters accumulated in the optimizer's fp32 buffers: the
    step (and the clip norm) equal one step on the fp32 sum, and the buffers are freed."""
    torch.manual_seed(5)
    init = torch.randn(3, 70, device=DEVICE)
    parts = [torch.randn(3, 70, device=DEVICE).half() for _ in range(3)]
    p = init.half().clone().requires_grad_()
    opt = MainWeightsAdamW([p], lr=1e-2, weight_decay=0.1)
    for g in parts:
        p.grad = g.clone()
        opt.accumulate_grads()
        assert p.grad is None
    norm = opt.clip_grad_norm_(0.5)
    opt.step()
    q = init.half().clone().requires_grad_()
    ref = MainWeightsAdamW([q], lr=1e-2, weight_decay=0.1)
    if hasattr(torch.Tensor, "grad_dtype"):
        q.grad_dtype = torch.float32
        q.grad = sum(g.float() for g in parts)  # fp32 gradient of an fp16 parameter
    else:  # a torch whose gradients must have the parameter's dtype: one buffer, added once
        q.grad = parts[0].clone()
        ref.accumulate_grads()
        ref.state[q]["grad_acc"].copy_(sum(g.float() for g in parts))
    ref_norm = ref.clip_grad_norm_(0.5)
    ref.step()
    assert_close("norm", norm, ref_norm, torch.float32)
    assert_equal("main weights", opt.state[p]["main"], ref.state[q]["main"])
    assert_equal("parameter", p.detach(), q.detach())
    assert "grad_acc" not in opt.state[p], "the buffer is freed by the step"


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, None], ids=["fp32", "fp16", "in-place fp32"])
def test_multi_tensor_step_equals_one_launch_per_tensor(param_dtype):
    """`adamw_multi_step` (every tensor of a group in one grid, each program finding its tensor in
    an address table) writes bit for bit what `adamw_step` writes tensor by tensor: sizes from one
    element to several programs, a scalar, an empty tensor, a non-contiguous parameter and grad,
    and tensors in both of its launches (16-byte aligned with numel a multiple of 16, and not:
    sizes off 16, and a view one element into its storage)."""
    g = torch.Generator().manual_seed(5)
    shapes = [(3, 5), (1000,), (7,), (2049,), (), (0,), (64, 33), (4096,), (16, 48), (32,)]

    def tensors():
        out = []
        for i, shape in enumerate(shapes):
            main = torch.randn(shape, generator=g)
            grad = torch.randn(shape, generator=g).to(param_dtype or torch.float32)
            if i == 6:
                grad = torch.randn(33, 64, generator=g).to(grad.dtype).t()  # non-contiguous
            param = None if param_dtype is None else main.to(param_dtype)
            if param is not None and i == 6:
                param = main.to(param_dtype).t().contiguous().t()  # non-contiguous
            if i == 9:  # one element into their storage: not 16-byte aligned
                main, grad = torch.cat([main[:1], main])[1:], torch.cat([grad[:1], grad])[1:]
            out.append([t if t is None else t.to(DEVICE) for t in (param, grad, main, torch.randn(shape, generator=g),
                                                                      torch.rand(shape, generator=g))])
        return out

    rows = tensors()
    copy = [[None if t is None else t.clone() for t in row] for row in rows]
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=7.0,
                 grad_scale=torch.tensor(0.25, device=DEVICE))
    adamw_multi_step(*(list(c) for c in zip(*rows)), **hyper)
    for row in copy:
        adamw_step(*row, **hyper)
    for i, (a, b) in enumerate(zip(rows, copy)):
        for name, x, y in zip(("param", "grad", "main", "exp_avg", "exp_avg_sq"), a, b):
            if x is not None:
                assert torch.equal(x, y), (i, name)
    with pytest.raises(ValueError, match="lists of one length"):
        adamw_multi_step([None], [], [], [], [], **hyper)
