"""CPU merge of partial attention states: kernels.reference.merge_states_ref's result in fewer ops.

A decode step merges a handful of tiny states ([T, H, D] with T the batch) once per layer, right
after the partial attention has streamed its KV through the cache; there each distinct tensor op
costs tens of microseconds (~10x its warm cost), so the op count is the cost. Against the
reference: softmax for the weights instead of logsumexp's eight ops and an exp, logaddexp in list
order for the lse, and the guard against garbage in empty partitions only when a partition is
empty somewhere (read on the host while the lses are few: one small copy instead of two ops).
The reference stays the oracle; tests/kernels/test_cpu_merge.py compares them.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
# Past this many lses, reading them to the host costs more than the guard it might spare.
_HOST_CHECK_MAX = 4096


def merge_states_cpu(states: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """states: non-empty list of (out [T, H, D], lse [T, H] fp32). Same contract as merge_states_ref:
    lse = logsumexp_i(lse_i), out = sum_i exp(lse_i - lse) * out_i summed in fp32 in list order;
    (0, -inf) where every lse_i is -inf; an empty partition's out is ignored even if it is garbage."""
    out_dtype = states[0][0].dtype
    if len(states) == 2 and not (_any_empty(states[0][1]) or _any_empty(states[1][1])):
        return _merge_two(*states[0], *states[1])
    lses = torch.stack([lse for _, lse in states])  # [N, T, H] fp32
    outs = torch.stack([out for out, _ in states])  # [N, T, H, D]
    if outs.dtype != torch.float32:
        outs = outs.float()
    # exp(lse_i - lse); softmax makes NaN where every lse_i is -inf, and those weigh nothing.
    weights = torch.softmax(lses, dim=0).nan_to_num_(0.0).unsqueeze(-1)  # [N, T, H, 1]
    if _any_empty(lses):
        outs = torch.where(weights > 0, outs, 0.0)  # 0 * NaN would be NaN
    out = (outs * weights).sum(dim=0)  # partitions summed in list order
    lse, *rest = lses.unbind(0)
    for lse_i in rest:
        lse = torch.logaddexp(lse, lse_i)  # -inf where every partition is empty
    return (out if out_dtype == torch.float32 else out.to(out_dtype)), lse


def _merge_two(out1, lse1, out2, lse2):
    """The usual pair (a memory server's partition, then the local one), both with tokens in every
    row: five ops instead of the general path's ten, where each op costs tens of microseconds."""
    lse = torch.logaddexp(lse1, lse2)
    out = out1.float() * (lse1 - lse).exp_().unsqueeze(-1)  # a new tensor: out1 stays as it was
    out.addcmul_(out2.float(), (lse2 - lse).exp_().unsqueeze(-1))  # summed in list order
    return (out if out1.dtype == torch.float32 else out.to(out1.dtype)), lse


def _any_empty(lses: torch.Tensor) -> bool:
    # Only an empty (-inf) entry can carry a garbage out: a finite lse is a partition that saw tokens.
    return lses.numel() > _HOST_CHECK_MAX or NEG_INF in lses.reshape(-1).tolist()
