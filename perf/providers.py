"""What a sweep compares. Each provider turns one case's inputs into timed callables.

* ``cutemla``: the public API, ``flash_mla_with_kvcache`` (the CuTe DSL kernels on sm90, the reference
  elsewhere; the ``backend`` column says which). ``full`` builds a fresh ``FlashMLASchedMeta`` per call, so the
  device scheduler runs inside the timed call; ``reuse`` passes old-style metadata computed once.
* ``reference``: ``cutemla.mla_decode_reference`` (fp32, a Python loop over requests; small cases only).
* ``sdpa``: the same model *without* weight absorption, as plain multi-head attention in
  ``torch.nn.functional.scaled_dot_product_attention``: h_q heads, q/k head dim 192 (128 no-RoPE + 64 RoPE)
  and v head dim 128 (DeepSeek-V2/V3), a dense per-head K/V cache of length round(mean_sk) per request (no
  paging, no length variation: both favour SDPA). This is what MLA's latent cache replaces: it reads
  h_q * 320 * 2 bytes per token instead of 576 * 2, so large cases are skipped when K/V exceed the memory budget.
* ``sdpa-latent``: the absorbed computation (exactly MLA decode's math) in SDPA: per KV head one shared
  576-dim K whose first 512 columns are V, with the h_q / h_kv grouped heads and s_q queries folded into the
  query length (no K/V expansion). Dense, unpaged; fixed-length cases gather the real cache (and are checked
  against the reference), varlen ones use random data of length round(mean_sk).
* ``flashinfer``: ``flashinfer.mla.BatchMLAPagedAttentionWrapper`` on the same paged cache (split into
  contiguous ckv [.., 512] and kpe [.., 64] copies), planned once (``plan`` is host work, so there is no
  ``full`` timing). Skipped when flashinfer is not importable, or for h_kv != 1 / d != 576.
* ``flashmla-baseline``: no run; the matching row of perf/baselines/flashmla_h100.csv (H100, FlashMLA 9241ae3),
  or for the sparse FP8 case FlashMLA reports (b128, s_q 2, h_q 128, topk 2048) its ~410 TFLOP/s on an H800.

FP8 cases (``fp8`` / ``topk<N>``, perf/cases.py): ``cutemla`` calls ``flash_mla_with_kvcache(...,
is_fp8_kvcache=True)`` with ``indices`` (sparse) or without (dense, bf16 q over the 656-byte cache) and
``reference`` runs ``cutemla.reference_sparse``; inputs, FLOPs and bytes come from perf/sparse_fp8.py. The SDPA
and flashinfer providers have no FP8 cache and skip these cases.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from cutemla.testing import decode_bytes, decode_flops

__all__ = ["Bench", "PROVIDERS", "BASELINE_CSV", "load_baseline", "get_provider"]

BASELINE_CSV = Path(__file__).resolve().parent / "baselines" / "flashmla_h100.csv"
DV = 512


@dataclasses.dataclass
class Bench:
    """Callables for one (provider, case); one entry per input copy (L2 rotation)."""

    reuse: list  # metadata (if any) computed once
    full: Optional[list]  # whole call incl. metadata; None when the provider has no metadata step
    capturable: bool
    flops: float
    nbytes: float
    backend: str
    output: Optional[Callable[[], torch.Tensor]] = None  # out [b, s_q, h_q, 512] comparable to the reference
    extra: dict = dataclasses.field(default_factory=dict)  # schema columns (num_sm_parts, note, ...); "_" keys: internal
    # True when the provider has a metadata/plan step: then a missing ``full`` means "not measured" (NaN);
    # otherwise the whole call is the reused call and both timings are the same number.
    has_metadata: bool = False


@dataclasses.dataclass
class Limits:
    reference_max_tokens: int  # b * s_k above which the reference is skipped
    memory_budget_bytes: float  # for the SDPA providers' dense tensors


class Provider:
    name = ""
    needs_inputs = True

    def skip_reason(self, case, limits: Limits) -> Optional[str]:
        return None

    def working_set(self, data) -> float:
        """Bytes a call streams (decides how many input copies keep L2 cold)."""
        return float(data.kcache.numel() * data.kcache.element_size() + data.q.numel() * data.q.element_size())

    def build(self, data, copies: int) -> Bench:
        raise NotImplementedError


def _mean_sk(data) -> float:
    return float(data.mean_seqlen)


def _is_sparse(data) -> bool:
    return getattr(data, "indices", None) is not None


def _is_fp8(data) -> bool:
    return data.kcache.dtype == torch.uint8  # FlashMLA's packed 656-byte tokens


def _fp8_work(data) -> tuple[float, float]:
    """(FLOPs, bytes) of an FP8 case by perf/sparse_fp8.py's formulas (656 bytes per cache token read)."""
    from .sparse_fp8 import dense_fp8_metrics, metrics

    b, s_q, h_q, _ = data.q.shape
    if _is_sparse(data):
        return metrics(b, s_q, h_q, data.indices.shape[-1], data.indices)
    return dense_fp8_metrics(b, s_q, h_q, data.cache_seqlens)


def _bf16_cache_only(case) -> Optional[str]:
    return "skipped: no FP8 cache in this provider" if case.fp8 else None


class CutemlaProvider(Provider):
    name = "cutemla"

    def build(self, data, copies):
        if _is_fp8(data):
            return self._build_fp8(data, copies)
        import warnings

        from cutemla.interface import active_backend, flash_mla_with_kvcache, get_mla_metadata

        q, kcache, block_table, seqlens = data.q, data.kcache, data.block_table, data.cache_seqlens
        b, s_q, h_q, d = q.shape
        h_kv = kcache.shape[2]
        causal = data.case.causal
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="cutemla: CuTe DSL kernel unavailable")
            backend = active_backend(q.device)
            meta, num_splits = get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv, h_q)
        caches = [kcache] + [kcache.clone() for _ in range(copies - 1)]

        def make_full(cache):
            def call():
                sched, _ = get_mla_metadata()
                return flash_mla_with_kvcache(q, cache, block_table, seqlens, DV, sched, causal=causal)[0]
            return call

        def make_reuse(cache):
            def call():
                return flash_mla_with_kvcache(q, cache, block_table, seqlens, DV, meta, num_splits, causal=causal)[0]
            return call

        mean_sk = _mean_sk(data)
        return Bench(
            reuse=[make_reuse(c) for c in caches], full=[make_full(c) for c in caches],
            capturable=backend == "kernel", backend=backend,
            flops=decode_flops(b, s_q, h_q, h_kv, mean_sk, d=d), nbytes=decode_bytes(b, s_q, h_q, h_kv, mean_sk, d=d),
            output=make_reuse(kcache), has_metadata=True,
            extra={"num_sm_parts": int(meta.shape[0]), "total_splits": int(num_splits[-1])},
        )

    def _build_fp8(self, data, copies):
        """``is_fp8_kvcache=True``: sparse with ``indices`` (FlashMLASchedMeta only records the config, so
        ``reuse`` keeps one), dense without (old-style split-KV metadata reused, as the bf16 path)."""
        import warnings

        from cutemla.interface import active_backend, flash_mla_with_kvcache, get_mla_metadata

        q, kcache = data.q, data.kcache
        b, s_q, h_q, _ = q.shape
        sparse = _is_sparse(data)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="cutemla: CuTe DSL kernel unavailable")
            backend = active_backend(q.device)
            if sparse:
                meta, num_splits = get_mla_metadata()
            else:
                # old-style metadata rejects is_fp8_kvcache; the split schedule depends only on lengths and shape
                meta, num_splits = get_mla_metadata(data.cache_seqlens, s_q * h_q, 1, h_q)
        caches = [kcache] + [kcache.clone() for _ in range(copies - 1)]
        if sparse:
            args = dict(is_fp8_kvcache=True, indices=data.indices, attn_sink=data.attn_sink)
            block_table = seqlens = None
        else:
            args = dict(is_fp8_kvcache=True, causal=data.case.causal)
            block_table, seqlens = data.block_table, data.cache_seqlens

        def make_full(cache):
            def call():
                sched, _ = get_mla_metadata()
                return flash_mla_with_kvcache(q, cache, block_table, seqlens, DV, sched, **args)[0]
            return call

        def make_reuse(cache):
            def call():
                return flash_mla_with_kvcache(q, cache, block_table, seqlens, DV, meta, num_splits, **args)[0]
            return call

        flops, nbytes = _fp8_work(data)
        extra = {} if sparse else {"num_sm_parts": int(meta.shape[0]), "total_splits": int(num_splits[-1])}
        return Bench(reuse=[make_reuse(c) for c in caches], full=[make_full(c) for c in caches],
                     capturable=backend == "kernel", backend=backend, flops=flops, nbytes=nbytes,
                     output=make_reuse(kcache), has_metadata=not sparse, extra=extra)


class ReferenceProvider(Provider):
    name = "reference"

    def skip_reason(self, case, limits):
        if case.reference_tokens > limits.reference_max_tokens:
            what = "b*s_q*topk" if case.topk else "b*s_k"
            return f"skipped: {what} = {case.reference_tokens} > {limits.reference_max_tokens} (reference too slow)"
        return None

    def build(self, data, copies):
        if _is_fp8(data):
            return self._build_fp8(data)
        from cutemla.reference import mla_decode_reference

        q, kcache, block_table, seqlens = data.q, data.kcache, data.block_table, data.cache_seqlens
        b, s_q, h_q, d = q.shape
        h_kv = kcache.shape[2]

        def call():
            return mla_decode_reference(q, kcache, block_table, seqlens, DV, None, data.case.causal)[0]

        mean_sk = _mean_sk(data)
        return Bench(reuse=[call], full=None, capturable=False, backend="reference (fp32 torch)",
                     flops=decode_flops(b, s_q, h_q, h_kv, mean_sk, d=d),
                     nbytes=decode_bytes(b, s_q, h_q, h_kv, mean_sk, d=d), output=call)

    @staticmethod
    def _build_fp8(data):
        from cutemla.reference_sparse import dense_fp8_mla_decode_reference, sparse_mla_decode_reference

        if _is_sparse(data):
            def call():
                return sparse_mla_decode_reference(data.q, data.kcache, data.indices, attn_sink=data.attn_sink)[0]
        else:
            def call():
                return dense_fp8_mla_decode_reference(data.q, data.kcache, data.block_table, data.cache_seqlens, DV,
                                                      None, data.case.causal)[0]
        flops, nbytes = _fp8_work(data)
        return Bench(reuse=[call], full=None, capturable=False, backend="reference (fp32 torch, FP8 dequantised)",
                     flops=flops, nbytes=nbytes, output=call)


def _randn(shape, dtype, device, gen):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / 10).clamp_(-1, 1).to(dtype)


def _lower_right_mask(rows_per_query_group: int, s_q: int, length: int, device) -> torch.Tensor:
    """Bool [g * s_q, L] mask: row r is query r % s_q, which sees keys j <= L - s_q + (r % s_q)."""
    query = torch.arange(rows_per_query_group * s_q, device=device) % s_q
    keys = torch.arange(length, device=device)
    return keys[None, :] <= (length - s_q + query)[:, None]


class SdpaMhaProvider(Provider):
    """Non-absorbed MLA as MHA: qk head dim 192, v head dim 128, h_q K/V heads."""

    name = "sdpa"
    QK, V = 192, 128

    def _kv_bytes(self, case) -> float:
        return float(case.b) * case.h_q * case.s_k * (self.QK + self.V) * 2

    def skip_reason(self, case, limits):
        if case.fp8:
            return _bf16_cache_only(case)
        need = self._kv_bytes(case) * (1.5 if case.varlen else 1.0)
        if need > limits.memory_budget_bytes:
            return (f"skipped: MHA K/V cache would need {need / 2**30:.1f} GiB "
                    f"> budget {limits.memory_budget_bytes / 2**30:.1f} GiB")
        return None

    def working_set(self, data):
        case = data.case
        return float(case.b) * case.h_q * max(1, round(_mean_sk(data))) * (self.QK + self.V) * 2

    def build(self, data, copies):
        import torch.nn.functional as F

        case, device, dtype = data.case, data.q.device, data.q.dtype
        b, s_q, h_q = case.b, case.s_q, case.h_q
        length = max(1, round(_mean_sk(data)))
        gen = torch.Generator(device=device)
        gen.manual_seed(case.seed)
        q = _randn((b, h_q, s_q, self.QK), dtype, device, gen)
        kvs = [(_randn((b, h_q, length, self.QK), dtype, device, gen), _randn((b, h_q, length, self.V), dtype, device, gen))
               for _ in range(copies)]
        # A bool mask, not torch.nn.attention.bias.causal_lower_right: importing that pulls in torch._dynamo (3 s).
        mask = _lower_right_mask(1, s_q, length, device) if case.causal and s_q > 1 else None

        def make(k, v):
            return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        flops = float(b) * h_q * s_q * length * 2 * (self.QK + self.V)
        nbytes = 2.0 * b * h_q * (s_q * (self.QK + self.V) + length * (self.QK + self.V))
        return Bench(reuse=[make(k, v) for k, v in kvs], full=None, capturable=device.type == "cuda",
                     backend="torch sdpa (MHA 192/128)", flops=flops, nbytes=nbytes,
                     extra={"note": f"dense per-head K/V, length {length} for every request"})


class SdpaLatentProvider(Provider):
    """Absorbed MLA (the decode's own math) through SDPA, heads folded into the query length."""

    name = "sdpa-latent"

    def skip_reason(self, case, limits):
        if case.fp8:
            return _bf16_cache_only(case)
        kv = float(case.b) * case.h_kv * case.s_k * case.d * 2
        scores = 3.0 * case.b * case.h_q * case.s_q * case.s_k * 4  # math backend: fp32 scores + softmax
        need = (kv + scores) * (1.5 if case.varlen else 1.0)
        if need > limits.memory_budget_bytes:
            return f"skipped: needs ~{need / 2**30:.1f} GiB > budget {limits.memory_budget_bytes / 2**30:.1f} GiB"
        return None

    def working_set(self, data):
        case = data.case
        return float(case.b) * case.h_kv * max(1, round(_mean_sk(data))) * case.d * 2

    @staticmethod
    def _dense_cache(data) -> torch.Tensor:
        """[b, h_kv, L, d] gathered from the paged cache (fixed-length cases: every request is L long)."""
        case = data.case
        length = case.s_k
        pages = -(-length // case.page_size)
        table = data.block_table[:, :pages].long()
        dense = data.kcache[table]  # [b, pages, page, h_kv, d]
        dense = dense.reshape(case.b, pages * case.page_size, case.h_kv, case.d)[:, :length]
        return dense.permute(0, 2, 1, 3).contiguous()

    def build(self, data, copies):
        import torch.nn.functional as F

        case, device, dtype = data.case, data.q.device, data.q.dtype
        b, s_q, h_q, h_kv, d = case.b, case.s_q, case.h_q, case.h_kv, case.d
        group = h_q // h_kv
        real = not case.varlen and case.zero_frac == 0
        if real:
            length = case.s_k
            first = self._dense_cache(data)
            caches = [first] + [first.clone() for _ in range(copies - 1)]
        else:
            length = max(1, round(_mean_sk(data)))
            gen = torch.Generator(device=device)
            gen.manual_seed(case.seed)
            caches = [_randn((b, h_kv, length, d), dtype, device, gen) for _ in range(copies)]
        # q [b, s_q, h_q, d] -> [b, h_kv, group * s_q, d], rows ordered (head in group, query).
        q = data.q.reshape(b, s_q, h_kv, group, d).permute(0, 2, 3, 1, 4).reshape(b, h_kv, group * s_q, d)
        mask = _lower_right_mask(group, s_q, length, device) if case.causal and s_q > 1 else None
        scale = d ** -0.5

        def make(k):
            return lambda: F.scaled_dot_product_attention(q, k, k[..., :DV], attn_mask=mask, scale=scale)

        def output():
            out = make(caches[0])()  # [b, h_kv, group * s_q, 512]
            return out.reshape(b, h_kv, group, s_q, DV).permute(0, 3, 1, 2, 4).reshape(b, s_q, h_q, DV)

        return Bench(reuse=[make(k) for k in caches], full=None, capturable=device.type == "cuda",
                     backend="torch sdpa (latent 576/512, MQA folded)",
                     flops=decode_flops(b, s_q, h_q, h_kv, length, d=d),
                     nbytes=decode_bytes(b, s_q, h_q, h_kv, length, d=d),
                     output=output if real else None,
                     extra={"note": "real cache gathered dense" if real else f"random dense K, length {length}"})


class FlashInferProvider(Provider):
    name = "flashinfer"

    def skip_reason(self, case, limits):
        try:
            import flashinfer.mla  # noqa: F401
        except Exception as exc:  # ImportError, or a broken CUDA build
            return f"skipped: flashinfer not importable ({type(exc).__name__})"
        if case.fp8:
            return _bf16_cache_only(case)
        if case.h_kv != 1 or case.d != 576:
            return "skipped: flashinfer MLA needs h_kv == 1 and d == 576"
        return None

    def working_set(self, data):
        return float(data.kcache.numel() * data.kcache.element_size())

    def build(self, data, copies):
        import flashinfer.mla

        case, device = data.case, data.q.device
        b, s_q, h_q, d = data.q.shape
        page = data.kcache.shape[1]
        seqlens = data.cache_seqlens
        pages_needed = ((seqlens.long() + page - 1) // page).cpu()
        kv_indptr = torch.zeros(b + 1, dtype=torch.int32)
        kv_indptr[1:] = torch.cumsum(pages_needed, 0).to(torch.int32)
        table = data.block_table.cpu()
        kv_indices = torch.cat([table[i, : int(n)] for i, n in enumerate(pages_needed)] or [torch.zeros(0)])
        kv_indices = kv_indices.to(torch.int32).to(device)
        qo_indptr = (torch.arange(b + 1, dtype=torch.int32) * s_q).to(device)
        latent = data.kcache[:, :, 0]
        ckvs, kpes = [], []
        for i in range(copies):
            ckvs.append(latent[..., :DV].contiguous())  # flashinfer#1341: non-contiguous caches give wrong results
            kpes.append(latent[..., DV:].contiguous())
        q_nope = data.q[..., :DV].reshape(b * s_q, h_q, DV).contiguous()
        q_pe = data.q[..., DV:].reshape(b * s_q, h_q, d - DV).contiguous()
        workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=device)
        wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend="auto")
        wrapper.plan(qo_indptr, kv_indptr.to(device), kv_indices, seqlens.to(torch.int32), h_q, DV, d - DV, page,
                     bool(case.causal and s_q > 1), d ** -0.5, data.q.dtype, data.kcache.dtype)

        def make(ckv, kpe):
            return lambda: wrapper.run(q_nope, q_pe, ckv, kpe)

        def output():
            return make(ckvs[0], kpes[0])().reshape(b, s_q, h_q, DV)

        mean_sk = _mean_sk(data)
        return Bench(reuse=[make(c, k) for c, k in zip(ckvs, kpes)], full=None, capturable=True,
                     backend="flashinfer BatchMLAPagedAttentionWrapper",
                     flops=decode_flops(b, s_q, h_q, 1, mean_sk, d=d), nbytes=decode_bytes(b, s_q, h_q, 1, mean_sk, d=d),
                     output=output, has_metadata=True, extra={"note": "plan() once outside the timing; no full-call timing",
                                           "_keepalive": (workspace, wrapper)})


_baseline_cache: dict = {}


def load_baseline(path=BASELINE_CSV):
    import pandas as pd

    key = str(path)
    if key not in _baseline_cache:
        _baseline_cache[key] = pd.read_csv(path)
    return _baseline_cache[key]


class FlashMLABaselineProvider(Provider):
    """Reads perf/baselines/flashmla_h100.csv; ``baseline_row`` returns the matching row or None."""

    name = "flashmla-baseline"
    needs_inputs = False
    device_name = "NVIDIA H100 80GB HBM3"

    def baseline_row(self, case) -> Optional[dict]:
        if case.fp8 or case.h_kv != 1 or case.d != 576 or case.dtype != "bf16" or case.zero_frac or case.seed:
            return None
        frame = load_baseline()
        b, s_q, s_k, h_q, causal, varlen = case.baseline_key
        hit = frame[(frame.b == b) & (frame.s_q == s_q) & (frame.s_k == s_k) & (frame.h_q == h_q)
                    & (frame.causal == causal) & (frame.varlen == varlen)]
        if hit.empty:
            return None
        row = hit.iloc[0].to_dict()
        err = row.get("max_abs_err")
        row["max_abs_err"] = float(err) if err is not None and not (isinstance(err, float) and math.isnan(err)) else math.nan
        return row


PROVIDERS = {p.name: p for p in (CutemlaProvider(), ReferenceProvider(), SdpaMhaProvider(), SdpaLatentProvider(),
                                 FlashInferProvider(), FlashMLABaselineProvider())}


def get_provider(name: str) -> Provider:
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; providers are {', '.join(PROVIDERS)}")
    return PROVIDERS[name]
