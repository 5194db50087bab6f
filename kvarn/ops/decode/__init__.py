"""Decode op: attention of query rows over their sequence's packed pages plus the fp16 part.

``paged_attention`` (any number of query rows per sequence: decode and prefill continuation) and
``decode`` (one row per sequence, staged fp16 part fused) run the Triton kernels on CUDA and the
PyTorch reference elsewhere (``kvarn.ops.backend``). ``partial_attention`` and ``merge`` are the
small exact pieces a caller combines them with; ``varlen_attention`` is the prefill chunks of a
step over their fp16/bf16 past and themselves (FlashAttention on CUDA).

The Triton kernels cover power-of-two head_dim without soft-capping; a layer with head_dim 80/96
or a ``softcap`` runs the reference op instead (on the same device), with a one-line warning once
per process and reason (``kvarn.ops.triton_unsupported``). FlashAttention has no cap either: with
``softcap`` ``varlen_attention`` takes its reference too.
"""

from __future__ import annotations

import functools

import torch

from .. import backend, triton_unsupported
from . import reference
from .reference import merge, partial_attention

__all__ = ["decode", "merge", "paged_attention", "partial_attention", "varlen_attention"]


def _impl(t, layout, softcap):
    if backend(t) == "triton" and not triton_unsupported("decode", layout.head_dim, softcap):
        from . import triton as impl

        return impl
    return reference


def paged_attention(layout, pages, q, q_seq, q_tile, page_start, block_table, scale, softcap=None):
    """See ``reference.paged_attention``: ``(o [T, Hq, D], lse [T, Hq])`` float32, natural-log lse."""
    impl = _impl(pages, layout, softcap)
    extra = {"softcap": softcap} if impl is reference else {}
    return impl.paged_attention(layout, pages, q, q_seq, q_tile, page_start, block_table, scale, **extra)


def decode(layout, pages, staging, q, block_table, page_start, q_tile, first_slot, cur_slot, cur_len, scale,
           softcap=None, out=None):
    """See ``reference.decode``. ``out``: ``[B, Hq, D]`` in q's dtype to write (None: a new tensor,
    float32 from the reference, q's dtype from the kernel); returns the output."""
    impl = _impl(pages, layout, softcap)
    if impl is reference:
        o = reference.decode(layout, pages, staging, q, block_table, page_start, q_tile, first_slot, cur_slot,
                             cur_len, scale, softcap=softcap)
        if out is None:
            return o
        out.copy_(o.to(out.dtype))
        return out
    return impl.decode(layout, pages, staging, q, block_table, page_start, q_tile, first_slot, cur_slot, cur_len,
                       scale, out=out)


def _flash(q, k, v, scale, causal):
    """torch's FlashAttention kernel with its log-sum-exp: q ``[T, Hq, D]``, k/v ``[H, N, D]``
    (expanded to the query heads) → float32 ``(o [T, Hq, D], lse [T, Hq])``."""
    hq, h = q.shape[1], k.shape[0]
    qq = q.transpose(0, 1)[None]  # [1, Hq, T, D]
    kk = k.to(q.dtype).repeat_interleave(hq // h, 0)[None]
    vv = v.to(q.dtype).repeat_interleave(hq // h, 0)[None]
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention(qq, kk, vv, 0.0, causal, False, scale=scale)[:2]
    return o[0].transpose(0, 1).float(), lse[0].transpose(0, 1).float()


def _flash_ok(q) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[0] > 0


def _vllm_flash_varlen():
    """vLLM's FlashAttention varlen function (FA3 on Hopper) when vLLM's CUDA build is importable:
    native GQA, packed sequences, bottom-right causal alignment; None otherwise."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - no vLLM, or its CPU build: torch's kernel or the reference
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=4)
def _cu_on_device(cu: tuple, device: torch.device) -> torch.Tensor:
    """The sequence offsets as a device tensor, copied once per step (every layer of a step has the
    same chunks), not once per layer; read-only, so reusing one across steps is safe."""
    from ..transfer import to_device

    return to_device(list(cu), torch.int32, device)


def varlen_attention(q, k, v, cu_q: list[int], cu_k: list[int], scale, softcap=None, out=None):
    """Causal attention of packed sequences whose queries are the last positions of their keys
    (a prefill chunk over its cached past and itself): see ``reference.varlen_attention``.

    CUDA, fp16/bf16, no cap: vLLM's FlashAttention in one launch for all sequences when vLLM is
    there (the serving path), else torch's FlashAttention per sequence; elsewhere the reference.
    ``out``: ``[sum n_q, Hq, D]`` to write (q's dtype); returns the output."""
    n = len(cu_q) - 1
    if _flash_ok(q) and not softcap and n > 0:
        fa = _vllm_flash_varlen()
        if fa is not None:
            cu = _cu_on_device(tuple(cu_q) + tuple(cu_k), q.device)
            max_q = max(cu_q[i + 1] - cu_q[i] for i in range(n))
            max_k = max(cu_k[i + 1] - cu_k[i] for i in range(n))
            # FA3 on Hopper (vLLM's default there too; its FA2 build measured 1.5x slower on the H200)
            version = 3 if torch.cuda.get_device_capability(q.device)[0] == 9 else 2
            return fa(q, k.to(q.dtype), v.to(q.dtype), max_q, cu[: n + 1], max_k, cu[n + 1:], softmax_scale=scale,
                      causal=True, out=out, fa_version=version)
        res = out if out is not None else torch.empty_like(q)
        for i in range(n):
            q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
            if q1 == q0:
                continue
            o_c, lse_c = _flash(q[q0:q1], k[k1 - (q1 - q0):k1].transpose(0, 1), v[k1 - (q1 - q0):k1].transpose(0, 1),
                                scale, True)
            if k1 - k0 > q1 - q0:  # the past: every query sees all of it
                o_p, lse_p = _flash(q[q0:q1], k[k0:k1 - (q1 - q0)].transpose(0, 1),
                                    v[k0:k1 - (q1 - q0)].transpose(0, 1), scale, False)
                o_c, _ = merge(o_c, lse_c, o_p, lse_p)
            res[q0:q1] = o_c.to(res.dtype)
        return res
    o = reference.varlen_attention(q, k, v, cu_q, cu_k, scale, softcap)
    if out is None:
        return o
    out.copy_(o.to(out.dtype))
    return out
