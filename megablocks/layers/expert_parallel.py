"""The token exchange of the expert-parallel layers: counts, split sizes, dispatch and combine.

Legend: W ranks of the expert-parallel group, E experts, esd / hsd the expert / hidden sharding
degrees (`mpu`), L = E/esd local experts, T local tokens, N = T·K local assignments in expert
order, R rows this rank's experts receive.

    start(tokens_per_expert_E)   all-gathers [dtype, T, counts_E] of every rank (asynchronously,
                                 so the caller's local permutation overlaps it)
    wait()                       reads the gathered counts on the host: the split sizes of the
                                 all_to_all. This is the one host synchronisation of expert
                                 parallelism (the sizes of what travels must be known).
    dispatch(x_NH)               rank d receives, from every rank, the rows of the experts of
                                 shard d % esd (each rank's rows are tiled hsd times): [R, H],
                                 ordered by source rank, then local expert
    combine(y_RH)                the reverse exchange, the hsd partial FFN outputs summed: [N, H]
    pipeline(x_NH, compute)      dispatch, compute and combine in C chunks of the local experts
                                 (`moe_expert_parallel_chunks`), each chunk's exchanges in flight
                                 while another chunk computes: [N, H]

The chunked pipeline needs the rows in (chunk, destination rank, expert) order: `reorder` maps
expert ids to that order before the local permutation (the counts are mapped back before they
are exchanged, so the split sizes are computed from the counts in expert order, once per forward).
All C dispatches are started at once; chunk c's experts run as soon as its rows have arrived, and
its combine is started before chunk c + 1 runs. The backward mirrors it (`start_all_to_all`).

Before the first exchange, the ranks all-gather a fixed-size signature of their setup (sizes,
expert layout, the group's members) and every rank raises the same `ValueError` when they
disagree, instead of entering mismatched all_to_alls. The per-forward exchange carries the input
dtype, which is compared the same way.
"""

from typing import List, Sequence

import torch
import torch.distributed as dist

from megablocks.layers import mpu
from megablocks.layers.all_to_all import all_to_all, start_all_to_all, wait_all_to_all

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_SETUP_FIELDS = (
    "hidden_size", "ffn_hidden_size", "moe_num_experts", "moe_top_k", "mlp_type", "mlp_impl",
    "moe_block_size", "moe_capacity_factor (x1e6)", "memory_optimized_mlp", "moe_expert_bias",
    "moe_expert_parallel_chunks",
    "expert-parallel world size", "expert-parallel group members (hash)",
)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _members_hash(ranks: Sequence[int]) -> int:
    h = 0
    for r in ranks:
        h = (h * 1_000_003 + r + 1) % (1 << 61)
    return h


def _check_agree(what: Sequence[str], rows: torch.Tensor) -> None:
    """Raises on every rank alike when the gathered rows [W, F] differ in any field."""
    for j, name in enumerate(what):
        column = rows[:, j].tolist()
        if any(v != column[0] for v in column):
            values = ", ".join(f"rank {r}: {v}" for r, v in enumerate(column))
            raise ValueError(f"expert parallelism: the ranks of the expert-parallel group disagree on {name} ({values})")


def _all_gather(t: torch.Tensor, group, async_op: bool):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    work = dist.all_gather(parts, t, group=group, async_op=async_op)
    return parts, work


class TokenExchange:
    """The expert-parallel exchange of one layer (built once; `start` once per forward)."""

    def __init__(self, args, signature: Sequence[int]):
        self.group = args.expert_parallel_group
        self.world_size = mpu.get_expert_parallel_world_size(args)
        self.rank = mpu.get_expert_parallel_rank(args)
        self.num_experts = args.moe_num_experts
        self.esd = mpu.expert_sharding_degree(args)
        self.hsd = mpu.hidden_sharding_degree(args)
        self.experts_per_rank = mpu.experts_per_rank(args)
        self.first_expert = mpu.expert_shard_index(args) * self.experts_per_rank
        self.members = mpu.expert_parallel_global_ranks(args)
        self.signature = tuple(int(v) for v in signature) + (self.world_size, _members_hash(self.members))
        if len(self.signature) != len(_SETUP_FIELDS):
            raise ValueError(f"signature: expected {len(_SETUP_FIELDS) - 2} fields, got {len(signature)}")
        self._verified = False
        # Chunks of the local experts: [lo, hi) per chunk (local ids), and the order of the expert
        # ids that lays the rows out by (chunk, destination rank, expert).
        self.chunks = min(args.moe_expert_parallel_chunks, self.experts_per_rank) if self.hsd == 1 else 1
        L, C = self.experts_per_rank, self.chunks
        self.chunk_bounds = [(c * L // C, (c + 1) * L // C) for c in range(C)]
        order = [d * L + e for lo, hi in self.chunk_bounds for d in range(self.esd) for e in range(lo, hi)]
        position = [0] * self.num_experts
        for p, e in enumerate(order):
            position[e] = p
        self._position = torch.tensor(position, dtype=torch.int64)  # expert id -> its place in that order
        self._devices = {}

    def reorder(self, top_experts: torch.Tensor) -> torch.Tensor:
        """Expert ids mapped to their place in the chunked order (the ids themselves when C = 1)."""
        if self.chunks == 1:
            return top_experts
        table = self._devices.get(top_experts.device)
        if table is None:
            table = self._devices[top_experts.device] = self._position.to(top_experts.device)
        return table[top_experts.long()].to(top_experts.dtype)

    def counts_in_expert_order(self, counts_in_order: torch.Tensor) -> torch.Tensor:
        """[E] counts of the reordered ids -> [E] counts by expert id."""
        if self.chunks == 1:
            return counts_in_order
        return counts_in_order[self._devices[counts_in_order.device]]

    def verify_setup(self, device: torch.device) -> None:
        """All-gathers the setup signature and raises `ValueError` on every rank on a mismatch."""
        mine = torch.tensor(self.signature + (dist.get_rank(),), dtype=torch.int64, device=device)
        parts, _ = _all_gather(mine, self.group, async_op=False)
        rows = torch.stack(parts).cpu()
        _check_agree(_SETUP_FIELDS, rows[:, :-1])
        if rows[:, -1].tolist() != list(self.members):
            raise ValueError(
                f"expert_parallel_group: the ranks that answered ({rows[:, -1].tolist()}) are not the group's "
                f"members ({list(self.members)})"
            )
        self._verified = True

    def start(self, tokens_per_expert_E: torch.Tensor, x_TH: torch.Tensor) -> "_Pending":
        if not self._verified:
            self.verify_setup(x_TH.device)
        header = torch.tensor([_dtype_code(x_TH.dtype), x_TH.shape[0]], dtype=torch.int64, device=x_TH.device)
        payload = torch.cat([header, tokens_per_expert_E.to(torch.int64)])
        parts, work = _all_gather(payload, self.group, async_op=True)
        return _Pending(self, parts, work)


class _Pending:
    def __init__(self, exchange: TokenExchange, parts: List[torch.Tensor], work):
        self.exchange, self.parts, self.work = exchange, parts, work

    def wait(self) -> "ExchangePlan":
        self.work.wait()
        gathered_WP = torch.stack(self.parts)
        host_WP = gathered_WP.cpu()  # the documented host synchronisation
        _check_agree(("the input dtype (code in float32, float16, bfloat16, float64)",), host_WP[:, :1])
        return ExchangePlan(self.exchange, gathered_WP[:, 2:], host_WP[:, 2:], int(host_WP[:, 1].sum()))


class ExchangePlan:
    """The split sizes of one forward and the local expert id of every received row."""

    def __init__(self, ex: TokenExchange, counts_WE: torch.Tensor, host_counts_WE: torch.Tensor, global_tokens: int):
        self.ex = ex
        self._counts_WE, self._host_counts_WE = counts_WE, host_counts_WE
        self.experts_per_rank = ex.experts_per_rank
        self.global_tokens = global_tokens
        lo, hi = ex.first_expert, ex.first_expert + ex.experts_per_rank
        mine = host_counts_WE[ex.rank].view(ex.esd, ex.experts_per_rank).sum(dim=1).tolist()
        self.send_sizes = [int(mine[d % ex.esd]) for d in range(ex.world_size)]
        self.recv_sizes = [int(v) for v in host_counts_WE[:, lo:hi].sum(dim=1).tolist()]
        received = sum(self.recv_sizes)
        local_ids = torch.arange(ex.experts_per_rank, device=counts_WE.device, dtype=torch.int32).repeat(ex.world_size)
        self.local_experts_R = torch.repeat_interleave(local_ids, counts_WE[:, lo:hi].reshape(-1), output_size=received)

    def pipeline(self, x_NH: torch.Tensor, compute, during=None):
        """`combine(compute(dispatch(x), local_experts_R))` in the exchange's C chunks, for rows
        laid out by `TokenExchange.reorder` (hsd = 1): chunk c's received rows, ordered by source
        rank then local expert, go to `compute(x_RH, local_experts_R)` (local expert ids in
        chunk c's range); its output rows come back to their ranks. `during` (a callable or None)
        runs once every dispatch has started. Returns ([N, H], during's result or None)."""
        ex, host = self.ex, self._host_counts_WE
        mine = host[ex.rank]
        L, first = ex.experts_per_rank, ex.first_expert
        sends, recvs = [], []
        for lo, hi in ex.chunk_bounds:
            sends.append([int(mine[d * L + lo:d * L + hi].sum()) for d in range(ex.world_size)])
            recvs.append([int(v) for v in host[:, first + lo:first + hi].sum(dim=1).tolist()])
        starts = [start_all_to_all(part, recvs[c], sends[c], ex.group)
                  for c, part in enumerate(x_NH.split([sum(s) for s in sends]))]
        side = during() if during is not None else None
        returns = []
        for c, (lo, hi) in enumerate(ex.chunk_bounds):
            x_RH = wait_all_to_all(starts[c])
            ids = torch.arange(lo, hi, device=self._counts_WE.device, dtype=torch.int32).repeat(ex.world_size)
            local_R = torch.repeat_interleave(ids, self._counts_WE[:, first + lo:first + hi].reshape(-1),
                                              output_size=x_RH.shape[0])
            returns.append(start_all_to_all(compute(x_RH, local_R), sends[c], recvs[c], ex.group))
        return torch.cat([wait_all_to_all(r) for r in returns]), side

    def dispatch(self, x_NH: torch.Tensor) -> torch.Tensor:
        """Sends each local assignment row to the ranks holding its expert: [R, H]."""
        send = x_NH.repeat(self.ex.hsd, 1) if self.ex.hsd > 1 else x_NH
        return all_to_all(send, self.recv_sizes, self.send_sizes, self.ex.group)

    def combine(self, y_RH: torch.Tensor) -> torch.Tensor:
        """Returns the experts' rows to their source ranks, summing the FFN shards: [N, H]."""
        y = all_to_all(y_RH, self.send_sizes, self.recv_sizes, self.ex.group)
        if self.ex.hsd > 1:
            y = y.view(self.ex.hsd, -1, y.shape[-1]).sum(dim=0)
        return y
