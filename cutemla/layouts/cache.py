"""Torch-side views that fold query heads into rows per KV head (no cutlass import).

MLA decode treats the s_q * h_q / h_kv queries that share one KV head as the rows of one M tile:
row r of KV head k is query position r // g, head k * g + r % g, where g = h_q // h_kv.
"""
import torch


def fold_q(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """q [b, s_q, h_q, d] -> [b, s_q * g, h_kv, d] with row = s * g + head-in-group.

    A view when h_kv == 1 or s_q == 1; otherwise a (small) copy, because the rows of one KV head are
    then not an affine sequence in memory and a TMA box needs one.
    """
    b, s_q, h_q, d = q.shape
    if h_kv == 1:  # rows are already s * h_q + head: one reshape (the eager path counts each torch call)
        return q.reshape(b, s_q * h_q, 1, d)
    g = h_q // h_kv
    folded = q.view(b, s_q, h_kv, g, d).transpose(2, 3)  # [b, s_q, g, h_kv, d]
    return folded.reshape(b, s_q * g, h_kv, d)  # reshape copies only when a view is impossible


def out_rows_view(out: torch.Tensor, h_kv: int) -> torch.Tensor:
    """out [b, s_q, h_q, dv] -> [b, s_q, h_kv, g, dv] view (kernel indexes rows as (g, s_q))."""
    b, s_q, h_q, dv = out.shape
    return out.view(b, s_q, h_kv, h_q // h_kv, dv)


def lse_rows_view(lse: torch.Tensor, h_kv: int) -> torch.Tensor:
    """lse [b, h_q, s_q] -> [b, h_kv, g, s_q] view."""
    b, h_q, s_q = lse.shape
    return lse.view(b, h_kv, h_q // h_kv, s_q)
