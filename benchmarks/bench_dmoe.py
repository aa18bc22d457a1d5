"""One whole dMoE layer (router included) against plain-torch MoE layers, same weights, same run.

    python benchmarks/bench_dmoe.py --out DIR                  # CUDA, bf16: CSV + PNG + table
    python benchmarks/bench_dmoe.py --out DIR --breakdown      # also kernel time by stage
    python benchmarks/bench_dmoe.py --configs mixtral,olmoe --contenders sparse,torch_grouped_mm
    python benchmarks/bench_dmoe.py --smoke --dtype float32    # CPU: tiny shapes, every contender
Other flags: --modes fwd,fwdbwd, --rep N (CUDA: ms of timed calls per measurement; CPU: calls),
--dtype bfloat16|float16|float32 (default bfloat16; float32 on CPU, whose interpreter mishandles bf16),
--levers small_routing=0,fused_gather=0,fused_glu_input_grad_max_ffn=1024 (fields of the dMoE
layers' `megablocks.policy.KernelPolicy`: NAME turns a bool field on, NAME=0 off, NAME=N sets an
int field).

Layers: the configs of `common.CONFIGS` (T tokens, hidden H, ffn F, E experts, top-k) with their
expert MLP (`LAYER_KINDS`), training steps with few tokens (`SMALL_STEP_CONFIGS`: T=64, forward
and backward), and decode-sized variants (`DECODE_CONFIGS`: T=64, forward only,
under `torch.no_grad`, modules in eval mode); prefill-sized ones (`PREFILL_CONFIGS`: T=4096, the
same way) run when named in --configs.

Contenders (all share one router and one set of expert weights):
    sparse            dMoE, mlp_impl='sparse' (block-sparse SDD/DSD/DDS)
    grouped_triton    dMoE, mlp_impl='grouped', gmm_backend='triton'
    grouped_torch     dMoE, mlp_impl='grouped', gmm_backend='torch'
    grouped_gg        dMoE, mlp_impl='grouped', gmm_backend='gg' (CUDA, when grouped_gemm imports)
    naive             `NaiveMoE`: router, top-k, a loop over experts (index rows, MLP, index_add)
    torch_grouped_mm  `TorchGroupedMoE`: router, argsort, gather, F.grouped_mm per projection, index_add

Modes: 'fwd' (a training forward: autograd records the graph, the output is dropped) and
'fwdbwd' (the step training runs: every `.grad` set to None, as `optimizer.zero_grad()` leaves it,
then `layer(x).backward(g)` with a fixed random output gradient, into the `.grad` of the input and
of every parameter; a gradient returned in another layout than its parameter's is copied there by
AccumulateGrad, and that copy is timed). The same step by `torch.autograd.grad`, which returns
the gradients as computed and never pays that copy, is the extra column `autograd_grad_ms`.

Reported per (config, mode, contender):
    ms, p20_ms, p80_ms   `common.timed` (CUDA events); on CPU `time.perf_counter`, few calls
    tflops               expert FLOPs / time: per routed row (T·k rows) 4·H·F (MLP) or 6·H·F
                         (GLU), ×3 for fwdbwd; the router, permutations and activation are not
                         counted but are timed
    dense_tflops         one dense (T·k × H)·(H × F) matmul in the same run; pct_dense: tflops
                         as a percentage of it
    speedup              torch_grouped_mm ms / this contender's ms, same config and mode
    autograd_grad_ms     fwdbwd: the same step by `torch.autograd.grad` (no `.grad` written)
    host_ms              CUDA: median time the host takes to issue one step, from an idle device
                         (no synchronization inside the step); where it reaches `ms`, the step
                         is bound by the host, not by its kernels
    extra_mem_gib        peak memory of one step minus the memory allocated before it (the weights
                         and the input, every `.grad` None) and minus the `.grad` tensors the step
                         leaves (the same for every contender): what the layer needs on top of
                         its weights, input and gradients; nan on CPU
    graph_ms             decode and prefill layers on CUDA: the same forward captured in a CUDA graph and
                         replayed (no host time; nan for a contender that syncs); graph_speedup
                         likewise against torch_grouped_mm's graph_ms. With `--graph-steps` also
                         the fwdbwd step (every `.grad` None at capture, then `.backward()`: the
                         replay writes the same `.grad` tensors), as a trainer that captures its
                         steps runs it (e.g. Megatron's CUDA graphs)
    match                'ok' when the forward output (and, with fwdbwd, every gradient) agrees
                         with torch_grouped_mm's within `TOLERANCE` of the reference's largest
                         magnitude; 'MISMATCH' otherwise (the row is still timed, and the script
                         says so and exits with status 1); out_err, grad_err: the relative errors

dMoE is built without a load-balancing loss (`moe_loss_weight=0`) and without bias, so every
contender computes the same function: `out = Σ_k w_k · expert_{e_k}(x)`.

`--breakdown` (CUDA): a few fwdbwd steps of each contender under `torch.profiler`; the device time
of each kernel is summed into stages by its name (`STAGES`), printed per contender and written to
`dmoe_breakdown.csv`.
"""

import argparse
import dataclasses
import gc
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CONFIGS, dense_gemm_tflops, environment, graphed, print_table, timed, write_csv  # noqa: E402

from megablocks.layers.arguments import Arguments  # noqa: E402
from megablocks.layers.dmoe import dMoE  # noqa: E402
from megablocks.ops.activation import ACTIVATION_FUNCTIONS  # noqa: E402
from megablocks.policy import KernelPolicy  # noqa: E402

# The expert MLP of each layer of common.CONFIGS: (mlp_type, activation).
LAYER_KINDS = {
    "mixtral": ("glu", "silu"),
    "olmoe": ("glu", "silu"),
    "qwen3moe": ("glu", "silu"),
    "mb_paper": ("mlp", "gelu_tanh"),
}
ACTIVATIONS = ACTIVATION_FUNCTIONS

# Decode-sized layers: a common.CONFIGS layer at DECODE_TOKENS tokens, forward only.
DECODE_TOKENS = 64
DECODE_CONFIGS = {"mixtral_decode": "mixtral", "qwen3_decode": "qwen3moe"}
# Training steps with few tokens: a common.CONFIGS layer at DECODE_TOKENS tokens, forward and backward.
SMALL_STEP_CONFIGS = {"mixtral_t64": "mixtral", "qwen3_t64": "qwen3moe"}
# Prefill-sized inference layers (forward only, as the decode ones), not in the default set.
PREFILL_TOKENS = 4096
PREFILL_CONFIGS = {"mixtral_prefill": "mixtral", "qwen3_prefill": "qwen3moe"}

# --smoke: tiny layers of both kinds (one of top-1; F not a multiple of the tiles) and a decode
# layer; any device.
SMOKE_CONFIGS = {
    "smoke_glu": ((32, 32, 48, 4, 2), "glu", "silu", False),
    "smoke_mlp": ((24, 32, 40, 4, 1), "mlp", "gelu_tanh", False),
    "smoke_decode": ((8, 32, 48, 4, 2), "glu", "silu", True),
}

CONTENDERS = ("sparse", "grouped_triton", "grouped_torch", "grouped_gg", "naive", "torch_grouped_mm")
REFERENCE = "torch_grouped_mm"
MODES = ("fwd", "fwdbwd")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Largest |contender - reference| / largest |reference|, per tensor, that counts as agreement.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}

# Kernel name -> stage, first match wins (substrings of the lower-cased name). Our Triton kernels
# are named as in megablocks/backend/*.py; the rest are torch's CUDA kernels (softmax, topk, radix
# sort, scans, index_select/index_add, elementwise functors) and cuBLAS / CUTLASS GEMMs.
STAGES = (
    ("topology", ("_topology_kernel",)),
    ("routing", ("_histogram_kernel", "_route_kernel", "softmax", "topk", "sort", "radix", "scan",
                 "histogram", "histc", "nonzero", "deviceselect", "scatter_gather", "bincount")),
    ("gemm:sdd", ("_sdd_kernel",)),
    ("gemm:dsd/dds", ("_dsd_kernel",)),
    ("gemm:gmm_var_k", ("_gmm_var_k_kernel",)),
    ("gemm:gmm", ("_gmm_kernel",)),
    ("gemm:grouped", ("grouped", "groupproblemshape")),
    ("gemm:dense", ("gemm", "nvjet", "xmma", "cublas", "cutlass", "matmul")),
    ("gather", ("_gather_kernel", "indexselect", "index_select", "index_elementwise", "gather")),
    ("scatter", ("_scatter_kernel", "_weight_grad_kernel", "indexfunc", "index_add", "index_put",
                 "indexing_backward", "scatter")),
    ("activation", ("silu", "gelu", "tanh", "sigmoid", "mulfunctor")),
)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One benchmarked MoE layer."""

    name: str
    T: int
    H: int
    F: int
    E: int
    k: int
    mlp_type: str
    activation: str
    decode: bool  # an inference layer (decode or prefill): forward only, under no_grad, eval mode

    @property
    def flops_fwd(self) -> int:
        """Expert FLOPs of one forward: T·k routed rows, 2·H·F per projection (2 or 3 of them)."""
        projections = 3 if self.mlp_type == "glu" else 2
        return 2 * projections * self.T * self.k * self.H * self.F

    def modes(self) -> Tuple[str, ...]:
        return ("fwd",) if self.decode else MODES


def all_layers(smoke: bool) -> Dict[str, Layer]:
    """{name: Layer}: the smoke layers, or the CONFIGS layers and their small-step, decode and
    prefill variants."""
    if smoke:
        return {name: Layer(name, *shape, mlp, act, decode)
                for name, (shape, mlp, act, decode) in SMOKE_CONFIGS.items()}
    layers = {name: Layer(name, *shape, *LAYER_KINDS[name], False) for name, shape in CONFIGS.items()}
    for configs, tokens, decode in ((SMALL_STEP_CONFIGS, DECODE_TOKENS, False), (DECODE_CONFIGS, DECODE_TOKENS, True),
                                    (PREFILL_CONFIGS, PREFILL_TOKENS, True)):
        for name, base in configs.items():
            _, H, F_, E, k = CONFIGS[base]
            layers[name] = Layer(name, tokens, H, F_, E, k, *LAYER_KINDS[base], decode)
    return layers


# --------------------------------------------------------------------------------------------
# The peers: plain-torch MoE layers on a dMoE's router and expert weights
# --------------------------------------------------------------------------------------------


class _Peer(torch.nn.Module):
    """Holds a dMoE's router and experts (the same modules, so the same parameters, by the same
    names: router.layer.weight, experts.mlp.w1, experts.mlp.v1, experts.mlp.w2)."""

    def __init__(self, moe: dMoE):
        super().__init__()
        args = moe.args
        self.router = moe.router
        self.experts = moe.experts
        self.num_experts, self.top_k = args.moe_num_experts, args.moe_top_k
        self.activation_fn = args.activation_fn

    def expert_weights(self):
        """w1, v1 (None for MLP), w2 as [E, F, H]: row f of expert e is row e·F + f of [E·F, H]."""
        E = self.num_experts
        mlp = self.experts.mlp
        w1, w2, v1 = mlp.w1, mlp.w2, getattr(mlp, "v1", None)
        return (w1.view(E, -1, w1.shape[-1]), None if v1 is None else v1.view(E, -1, v1.shape[-1]),
                w2.view(E, -1, w2.shape[-1]))


class NaiveMoE(_Peer):
    """x_TH -> out_TH: for each expert, the rows routed to it through its MLP, weighted, added."""

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        _, weights_TK, experts_TK = self.router(x_TH)
        w1_EFH, v1_EFH, w2_EFH = self.expert_weights()
        out_TH = torch.zeros_like(x_TH)
        for e in range(self.num_experts):
            token_M, slot_M = torch.where(experts_TK == e)
            x_MH = x_TH[token_M]
            a_MF = self.activation_fn(x_MH @ w1_EFH[e].t())
            if v1_EFH is not None:
                a_MF = a_MF * (x_MH @ v1_EFH[e].t())
            y_MH = a_MF @ w2_EFH[e]
            out_TH.index_add_(0, token_M, y_MH * weights_TK[token_M, slot_M, None])
        return out_TH


class TorchGroupedMoE(_Peer):
    """x_TH -> out_TH with `torch.nn.functional.grouped_mm`: the routed rows sorted by expert,
    one grouped GEMM per projection, weighted rows added back to their tokens. No host sync."""

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        _, weights_TK, experts_TK = self.router(x_TH)
        w1_EFH, v1_EFH, w2_EFH = self.expert_weights()
        experts_N = experts_TK.flatten()
        order_N = torch.argsort(experts_N, stable=True)
        token_N = order_N // self.top_k
        counts_E = torch.zeros(self.num_experts, dtype=torch.long, device=x_TH.device)
        counts_E.scatter_add_(0, experts_N, torch.ones_like(experts_N))
        offs_E = counts_E.cumsum(0).to(torch.int32)
        x_NH = x_TH[token_N]
        a_NF = self.activation_fn(F.grouped_mm(x_NH, w1_EFH.transpose(1, 2), offs=offs_E))
        if v1_EFH is not None:
            a_NF = a_NF * F.grouped_mm(x_NH, v1_EFH.transpose(1, 2), offs=offs_E)
        y_NH = F.grouped_mm(a_NF, w2_EFH, offs=offs_E)
        y_NH = y_NH * weights_TK.flatten()[order_N, None]
        return torch.zeros_like(x_TH).index_add_(0, token_N, y_NH)


# --------------------------------------------------------------------------------------------
# Building the contenders
# --------------------------------------------------------------------------------------------


def gg_available() -> bool:
    try:
        import grouped_gemm  # noqa: F401
    except ImportError:
        return False
    return True


def available_contenders(device: str) -> Tuple[str, ...]:
    """The contenders that can run on `device` ('grouped_gg' needs CUDA and grouped_gemm)."""
    return tuple(c for c in CONTENDERS if c != "grouped_gg" or (device == "cuda" and gg_available()))


def build_dmoe(layer: Layer, dtype: torch.dtype, device: str, mlp_impl: str = "sparse",
               gmm_backend: str = "auto", policy: Optional[KernelPolicy] = None) -> dMoE:
    args = Arguments(
        hidden_size=layer.H,
        ffn_hidden_size=layer.F,
        moe_num_experts=layer.E,
        moe_top_k=layer.k,
        mlp_type=layer.mlp_type,
        activation_fn=ACTIVATIONS[layer.activation],
        mlp_impl=mlp_impl,
        gmm_backend=gmm_backend,
        bias=False,
        moe_loss_weight=0.0,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        device=device,
        kernel_policy=policy,
    )
    return dMoE(args)


def share_parameters(moe: dMoE, source: dMoE) -> None:
    """Makes `moe` use `source`'s router and expert weights (the same Parameter objects)."""
    moe.router = source.router
    for name in ("w1", "v1", "w2"):
        if getattr(source.experts.mlp, name, None) is not None:
            setattr(moe.experts.mlp, name, getattr(source.experts.mlp, name))


def build_contenders(layer: Layer, names: Sequence[str], dtype: torch.dtype, device: str,
                     seed: int = 0, policy: Optional[KernelPolicy] = None) -> Dict[str, torch.nn.Module]:
    """{name: module} for `names` plus the reference, all on one router and one set of weights;
    the dMoE contenders run with `policy` (None: the defaults)."""
    torch.manual_seed(seed)
    source = build_dmoe(layer, dtype, device, policy=policy)
    modules: Dict[str, torch.nn.Module] = {}
    for name in dict.fromkeys([*names, REFERENCE]):
        if name == "naive":
            modules[name] = NaiveMoE(source)
        elif name == "torch_grouped_mm":
            modules[name] = TorchGroupedMoE(source)
        elif name == "sparse":
            modules[name] = source
        elif name.startswith("grouped_"):
            moe = build_dmoe(layer, dtype, device, "grouped", name[len("grouped_"):], policy=policy)
            share_parameters(moe, source)
            modules[name] = moe
        else:
            raise ValueError(f"contender: expected one of {CONTENDERS}, got {name!r}")
    for module in modules.values():
        module.train(not layer.decode)
    return modules


def parameters(modules: Dict[str, torch.nn.Module]) -> Dict[str, torch.nn.Parameter]:
    """The shared parameters by name (router.layer.weight, experts.mlp.w1, ...)."""
    return dict(modules[REFERENCE].named_parameters())


# --------------------------------------------------------------------------------------------
# Agreement with the reference
# --------------------------------------------------------------------------------------------


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().float().item() or 1.0
    return (actual - expected).abs().max().float().item() / scale


def errors(modules: Dict[str, torch.nn.Module], x: torch.Tensor, grad_out: Optional[torch.Tensor],
           reference: str = REFERENCE) -> Dict[str, Dict[str, float]]:
    """{contender: {'out': err, 'grad_x': err, 'grad_<param>': err, ...}} against `reference`:
    the largest absolute difference over the reference's largest magnitude, per tensor.
    Gradients (of `grad_out` w.r.t. x and every parameter) only when `grad_out` is given.
    A contender that raises gets None (and a message); the reference must run."""
    params = parameters(modules)
    inputs = [x, *params.values()]
    names = ["grad_x", *(f"grad_{n}" for n in params)]

    def run(module):
        if grad_out is None:
            with torch.no_grad():
                return {"out": module(x)}
        out = module(x)
        grads = torch.autograd.grad(out, inputs, grad_out)
        return {"out": out.detach(), **dict(zip(names, grads))}

    expected = run(modules[reference])
    result: Dict[str, Optional[Dict[str, float]]] = {reference: {key: 0.0 for key in expected}}
    for name, module in modules.items():
        if name == reference:
            continue
        try:
            actual = run(module)
        except Exception as err:  # a contender that cannot run here is reported, not fatal
            print(f"!!! {name}: failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            result[name] = None
            continue
        result[name] = {key: _rel_err(actual[key], expected[key]) for key in expected}
        del actual
    return result


# --------------------------------------------------------------------------------------------
# Timing, memory, profile
# --------------------------------------------------------------------------------------------


def cpu_timed(fn: Callable[[], object], rep: int) -> Tuple[float, float, float]:
    """(median, p20, p80) ms of `rep` calls, by time.perf_counter. No warm-up call of its own:
    on CPU nothing is compiled, and the agreement check has already run every contender once."""
    samples = []
    for _ in range(max(1, rep)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    t = torch.tensor(samples, dtype=torch.float64)
    return tuple(torch.quantile(t, q).item() for q in (0.5, 0.2, 0.8))


def time_fn(fn: Callable[[], object], device: str, rep: int) -> Tuple[float, float, float]:
    if device == "cuda":
        return timed(fn, warmup=max(25, rep // 4), rep=rep)
    return cpu_timed(fn, rep)


def graph_time_ms(fn: Callable[[], object], rep: int) -> float:
    """Median ms of `fn` captured in a CUDA graph and replayed (no host time: what a serving
    engine that captures its decode steps sees); nan when `fn` cannot be captured (it syncs)."""
    try:
        replay, _graph, _ = graphed(fn)
        return timed(replay, warmup=max(25, rep // 4), rep=rep)[0]
    except Exception as err:  # e.g. a host sync inside fn: not capturable
        print(f"  (not capturable in a CUDA graph: {type(err).__name__}: {str(err)[:120]})", flush=True)
        torch.cuda.synchronize()
        return float("nan")


def dense_tflops(m: int, n: int, k: int, dtype: torch.dtype, device: str, rep: int) -> float:
    """TFLOP/s of one dense (m×k)·(k×n) matmul in this run."""
    if device == "cuda":
        return dense_gemm_tflops(m, n, k, dtype=dtype, device=device)
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    a @ b
    return 2 * m * n * k / cpu_timed(lambda: a @ b, rep)[0] / 1e9


def clear_grads(inputs: List[torch.Tensor]) -> None:
    """Every `.grad` None, as `optimizer.zero_grad()` leaves it at the start of a step."""
    for t in inputs:
        t.grad = None


def steps(module: torch.nn.Module, mode: str, decode: bool, x: torch.Tensor, grad_out: torch.Tensor,
          inputs: List[torch.Tensor]) -> Tuple[Callable[[], object], Optional[Callable[[], object]]]:
    """(the step training runs, the same step by `torch.autograd.grad` or None) of one mode.

    fwdbwd: every `.grad` of `inputs` (x and the parameters) set to None, then `.backward()` into
    them; the second form returns the gradients without touching `.grad`."""
    if decode:
        def forward():
            with torch.no_grad():
                module(x)
        return forward, None
    if mode == "fwd":
        def train_forward():
            module(x)
        return train_forward, None

    def fwdbwd():
        clear_grads(inputs)
        module(x).backward(grad_out)

    def fwdbwd_autograd_grad():
        torch.autograd.grad(module(x), inputs, grad_out)

    return fwdbwd, fwdbwd_autograd_grad


def host_ms(step: Callable[[], object], device: str, samples: int = 15) -> float:
    """Median ms the host spends issuing `step()` from an idle device; nan on CPU."""
    if device != "cuda":
        return float("nan")
    times = []
    for _ in range(samples):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def extra_peak_gib(step: Callable[[], object], device: str, inputs: List[torch.Tensor]) -> float:
    """Peak memory during `step()` minus the memory allocated before it (every `.grad` of
    `inputs` None) and minus the `.grad` tensors the step leaves (GiB); nan on CPU."""
    if device != "cuda":
        return float("nan")
    clear_grads(inputs)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    grads = sum(t.grad.untyped_storage().nbytes() for t in inputs if t.grad is not None)
    return (torch.cuda.max_memory_allocated() - before - grads) / 2**30


def stage_of(kernel: str) -> str:
    """The stage (`STAGES`) a kernel's time is counted in, from its name."""
    name = kernel.lower()
    for stage, patterns in STAGES:
        if any(p in name for p in patterns):
            return stage
    return "other"


def kernel_times_us(step: Callable[[], object], repeats: int) -> Dict[str, float]:
    """{kernel name: device µs per step} over `repeats` calls of `step` under torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    times: Dict[str, float] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            times[event.name] = times.get(event.name, 0.0) + event.time_range.elapsed_us() / repeats
    return times


def breakdown_rows(layer: Layer, name: str, times_us: Dict[str, float]) -> List[Dict[str, object]]:
    """One row per stage: ms per step, % of the step's kernel time, kernels, the largest kernel."""
    total = sum(times_us.values()) or 1.0
    stages: Dict[str, List[Tuple[float, str]]] = {}
    for kernel, us in times_us.items():
        stages.setdefault(stage_of(kernel), []).append((us, kernel))
    rows = []
    for stage, kernels in sorted(stages.items(), key=lambda item: -sum(us for us, _ in item[1])):
        us = sum(t for t, _ in kernels)
        top_us, top = max(kernels)
        rows.append({"config": layer.name, "contender": name, "stage": stage, "ms": us / 1e3,
                     "pct": 100 * us / total, "kernels": len(kernels), "top_kernel": top[:80],
                     "top_kernel_ms": top_us / 1e3})
    rows.append({"config": layer.name, "contender": name, "stage": "total", "ms": total / 1e3, "pct": 100.0,
                 "kernels": len(times_us), "top_kernel": "", "top_kernel_ms": float("nan")})
    return rows


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _agreement(layer: Layer, name: str, err: Optional[Dict[str, float]], tol: float) -> Dict[str, object]:
    """The match, out_err and grad_err columns of a contender; says out loud what disagrees."""
    if err is None:
        return {"match": "error: failed to run", "out_err": float("nan"), "grad_err": float("nan")}
    bad = [key for key, v in err.items() if not v <= tol]  # NaN counts as a mismatch
    if bad:
        print(f"!!! {layer.name} {name}: " + ", ".join(f"{key} {err[key]:.3e}" for key in bad)
              + f" from {REFERENCE} (tolerance {tol:.0e}); timed anyway", flush=True)
    return {"match": "ok" if not bad else f"MISMATCH({','.join(bad)})", "out_err": err["out"],
            "grad_err": max((v for key, v in err.items() if key != "out"), default=float("nan"))}


def bench_layer(layer: Layer, names: Sequence[str], modes: Sequence[str], dtype: torch.dtype, device: str,
                rep: int, env: Dict[str, str], breakdown: bool, policy: Optional[KernelPolicy] = None,
                graph_steps: bool = False):
    """(result rows, breakdown rows) of one layer; every contender checked before it is timed;
    `graph_steps`: the fwdbwd step's `graph_ms` too (CUDA)."""
    modes = [m for m in layer.modes() if m in modes]
    if not modes:
        print(f"{layer.name}: none of its modes {layer.modes()} asked for; skipped")
        return [], []
    modules = build_contenders(layer, names, dtype, device, policy=policy)
    params = parameters(modules)
    torch.manual_seed(1)
    x = torch.randn(layer.T, layer.H, dtype=dtype, device=device, requires_grad=not layer.decode)
    grad_out = None if layer.decode else torch.randn(layer.T, layer.H, dtype=dtype, device=device)
    inputs = [x, *params.values()]

    check_grads = "fwdbwd" in modes
    errs = errors(modules, x, grad_out if check_grads else None)
    tol = TOLERANCE[dtype]
    dense = dense_tflops(layer.T * layer.k, layer.F, layer.H, dtype, device, rep)

    agreement = {name: _agreement(layer, name, errs[name], tol) for name in names}
    rows = []
    base = {"config": layer.name, "T": layer.T, "H": layer.H, "F": layer.F, "E": layer.E, "k": layer.k,
            "mlp": layer.mlp_type, "act": layer.activation, "dtype": str(dtype).replace("torch.", "")}
    for mode in modes:
        flops = layer.flops_fwd * (3 if mode == "fwdbwd" else 1)
        mode_rows = {}
        for name in names:
            row = {**base, "mode": mode, "contender": name, **agreement[name]}
            ms = p20 = p80 = mem = float("nan")
            if errs[name] is not None:
                if device == "cuda":  # each contender starts from the same allocator state
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                timed_step, autograd_step = steps(modules[name], mode, layer.decode, x, grad_out, inputs)
                try:
                    ms, p20, p80 = time_fn(timed_step, device, rep)
                    if autograd_step is not None:
                        row["autograd_grad_ms"] = time_fn(autograd_step, device, rep)[0]
                    row["host_ms"] = host_ms(timed_step, device)
                    mem = extra_peak_gib(timed_step, device, inputs)
                    clear_grads(inputs)
                    if device == "cuda" and (layer.decode or (graph_steps and mode == "fwdbwd")):
                        row["graph_ms"] = graph_time_ms(timed_step, rep)
                        clear_grads(inputs)
                except Exception as err:  # a contender that fails here is reported, not fatal
                    print(f"!!! {layer.name} {mode} {name}: failed: {type(err).__name__}: {str(err)[:200]}",
                          flush=True)
                    row["match"] = f"error: {type(err).__name__}"
            row.update({"ms": ms, "p20_ms": p20, "p80_ms": p80, "tflops": flops / ms / 1e9,
                        "dense_tflops": dense, "pct_dense": 100 * flops / ms / 1e9 / dense,
                        "extra_mem_gib": mem})
            mode_rows[name] = row
        ref_ms = mode_rows[REFERENCE]["ms"] if REFERENCE in mode_rows else float("nan")
        ref_graph_ms = mode_rows[REFERENCE].get("graph_ms", float("nan")) if REFERENCE in mode_rows else float("nan")
        for name, row in mode_rows.items():
            row["speedup"] = ref_ms / row["ms"]
            if "graph_ms" in row:
                row["graph_speedup"] = ref_graph_ms / row["graph_ms"]
            rows.append({**row, **env})
            print(f"{layer.name} {mode} {name}: {row['ms']:.3f} ms, {row['tflops']:.1f} TFLOP/s "
                  f"({row['pct_dense']:.0f}% of dense), {row['speedup']:.2f}x, "
                  f"+{row['extra_mem_gib']:.2f} GiB, {row['match']}", flush=True)

    prof_rows = []
    if breakdown and not layer.decode:
        if device != "cuda":
            print("--breakdown: needs CUDA (kernel times); skipped")
        else:
            for name in [n for n in names if errs[n] is not None]:
                timed_step, _ = steps(modules[name], "fwdbwd", False, x, grad_out, inputs)
                stage_rows = breakdown_rows(layer, name, kernel_times_us(timed_step, repeats=3))
                print(f"\n{layer.name} {name}: kernel time per fwdbwd step by stage")
                print_table(stage_rows, ["stage", "ms", "pct", "kernels", "top_kernel_ms", "top_kernel"])
                prof_rows += [{**r, **env} for r in stage_rows]
    return rows, prof_rows


def plot(rows: List[Dict[str, object]], path: str) -> None:
    """Bars of ms per config and contender, one panel per mode (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    modes = [m for m in ("fwdbwd", "fwd") if any(r["mode"] == m for r in rows)]
    if not modes:
        return
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rs = [r for r in rows if r["mode"] == mode]
        configs = list(dict.fromkeys(r["config"] for r in rs))
        names = list(dict.fromkeys(r["contender"] for r in rs))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ms = {r["config"]: r["ms"] for r in rs if r["contender"] == name}
            ax.bar([c + i * width for c in range(len(configs))], [ms.get(c, float("nan")) for c in configs],
                   width, label=name)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(configs))])
        ax.set_xticklabels(configs, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(f"ms per {mode} step ({rs[0]['dtype']})")
        ax.set_title(f"one MoE layer, {mode}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _split(value: str) -> List[str]:
    return [v for v in value.split(",") if v]


def parse_levers(levers: Sequence[str]) -> KernelPolicy:
    """The policy that --levers names: NAME turns a bool field on, NAME=0 / NAME=1 sets it, NAME=N
    sets an int field.

    Raises:
        ValueError: a name that is no field, or a value that does not fit the field.
    """
    fields = {f.name: f.type for f in dataclasses.fields(KernelPolicy)}
    changes = {}
    for lever in levers:
        name, _, value = lever.partition("=")
        if name not in fields:
            raise ValueError(f"--levers: expected names from {sorted(fields)}, got {lever!r}")
        if fields[name] is bool:
            if value not in ("", "0", "1"):
                raise ValueError(f"--levers: {name} is a bool field: expected {name}, {name}=0 or {name}=1, got {lever!r}")
            changes[name] = value != "0"
        else:
            if not value.isdigit():
                raise ValueError(f"--levers: {name} is an int field: expected {name}=N, got {lever!r}")
            changes[name] = int(value)
    return KernelPolicy(**changes)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=".", help="directory for dmoe.csv, dmoe.png, dmoe_breakdown.csv")
    p.add_argument("--configs", type=_split, default=None,
                   help=f"comma-separated; default all of {list(CONFIGS) + list(SMALL_STEP_CONFIGS) + list(DECODE_CONFIGS)} "
                        f"(also {list(PREFILL_CONFIGS)}; with --smoke: {list(SMOKE_CONFIGS)})")
    p.add_argument("--contenders", type=_split, default=None,
                   help=f"comma-separated; default every one of {list(CONTENDERS)} that runs here")
    p.add_argument("--modes", type=_split, default=list(MODES), help="comma-separated: fwd,fwdbwd")
    p.add_argument("--rep", type=int, default=None,
                   help="CUDA: ms of timed calls per measurement (do_bench rep, default 500); "
                        "CPU: number of timed calls (default 2)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--breakdown", action="store_true", help="kernel time by stage (CUDA, torch.profiler)")
    p.add_argument("--smoke", action="store_true", help="tiny layers, every contender; runs on CPU")
    p.add_argument("--graph-steps", action="store_true",
                   help="CUDA: also the fwdbwd step captured in a CUDA graph and replayed (graph_ms)")
    p.add_argument("--levers", type=_split, default=[],
                   help="comma-separated fields of the dMoE layers' megablocks.policy.KernelPolicy: NAME "
                        "turns a bool field on, NAME=0 off, NAME=N sets an int field (e.g. small_routing=0, "
                        "fused_gather=0, inference_form=0, fused_glu_input_grad_max_ffn=1024)")
    args = p.parse_args(argv)
    try:
        args.policy = parse_levers(args.levers)
    except ValueError as err:
        p.error(str(err))

    layers = all_layers(args.smoke)
    args.configs = args.configs or [name for name in layers if name not in PREFILL_CONFIGS]
    for name in args.configs:
        if name not in layers:
            p.error(f"--configs: expected names from {list(layers)}, got {name!r}")
    for name in args.contenders or []:
        if name not in CONTENDERS:
            p.error(f"--contenders: expected names from {list(CONTENDERS)}, got {name!r}")
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"--modes: expected names from {list(MODES)}, got {mode!r}")
    if args.rep is not None and args.rep < 1:
        p.error(f"--rep: expected a positive int, got {args.rep}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Runs the benchmark; returns the result rows. Exits with status 1 after writing the
    outputs when a contender disagrees with the reference or fails."""
    args = parse_args(argv)
    if args.levers:
        print(f"kernel policy: {args.policy}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    rep = args.rep or (500 if device == "cuda" else 2)
    here = available_contenders(device)
    names = [c for c in (args.contenders or CONTENDERS) if c in here]
    skipped = [c for c in (args.contenders or CONTENDERS) if c not in here]
    if skipped:
        print(f"skipped (cannot run here): {skipped}")
    if device == "cpu" and dtype == torch.bfloat16:
        print("note: Triton's interpreter mishandles bf16; use --dtype float32 on CPU")

    env = environment()
    print(env)
    if device == "cuda":
        from bench_gmm import warm_up_gpu

        warm_up_gpu()
    layers = all_layers(args.smoke)
    rows, prof_rows = [], []
    for name in args.configs:
        layer_rows, layer_prof = bench_layer(layers[name], names, args.modes, dtype, device, rep, env, args.breakdown,
                                             args.policy, args.graph_steps)
        rows += layer_rows
        prof_rows += layer_prof
        gc.collect()  # the layer's modules, weights and gradients are gone with bench_layer's frame
        if device == "cuda":
            torch.cuda.empty_cache()

    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "dmoe.csv"), rows)
    if prof_rows:
        write_csv(os.path.join(args.out, "dmoe_breakdown.csv"), prof_rows)
    plot(rows, os.path.join(args.out, "dmoe.png"))
    print(env)
    print_table(rows, ["config", "mode", "contender", "match", "ms", "p20_ms", "p80_ms", "tflops", "pct_dense",
                       "speedup", "autograd_grad_ms", "host_ms", "extra_mem_gib", "graph_ms", "graph_speedup"])
    bad = [r for r in rows if r["match"] != "ok"]
    if bad:
        print(f"!!! {len(bad)} row(s) did not match {REFERENCE} or failed: "
              + ", ".join(f"{r['config']}/{r['mode']}/{r['contender']}: {r['match']}" for r in bad))
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
