"""``MLADecoder``: static buffers and a plan/run split of MLA decode, for serving loops and CUDA graphs."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from cutemla import kernels, ops  # kernels: torch-side launchers only (cutlass loads at the first launch)
from cutemla.schedule import num_sm_parts
from cutemla.validation import SCHED_META_ROW_WORDS, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, check_softmax_scale

__all__ = ["MLADecoder"]

D_V = 512


class MLADecoder:
    """Paged MLA decode with every buffer preallocated, planned once per step and run once per layer.

    Contract for an engine:

    * **Sizes fixed at construction.** ``max_batch`` requests, ``s_q`` query tokens per request (1, or 1 + the
      number of draft tokens for MTP/speculative verify), ``h_q`` query heads, ``h_kv`` latent KV heads (1 for
      DeepSeek), ``head_dim`` 576 (512 latent + 64 RoPE) or 512, ``page_size`` (the kernel needs 64),
      ``dtype`` bf16/fp16 for q and the cache, ``max_blocks_per_seq`` block-table columns, ``causal``
      (bottom-right aligned, only matters for ``s_q > 1``) and ``softmax_scale`` (default ``head_dim ** -0.5``;
      DeepSeek uses ``(qk_nope + qk_rope) ** -0.5`` times its YaRN mscale).
    * **Static buffers** (same storage for the decoder's lifetime; safe to capture and to write in place):
      ``cache_seqlens`` int32 ``[max_batch]``; ``block_table`` int32 ``[max_batch, max_blocks_per_seq]``;
      ``q_buf`` ``[max_batch, s_q, h_q, head_dim]``; ``tile_scheduler_metadata`` int32
      ``[num_sm_parts, 8]``; ``num_splits`` int32 ``[max_batch + 1]``; ``out`` ``[max_batch, s_q, h_q, 512]``
      in ``dtype``; ``lse`` fp32 ``[max_batch, h_q, s_q]``. Split-KV accumulators are workspace of the
      decode call itself (allocated by shape only, so a CUDA graph's private pool keeps them).
    * **Per step**: ``plan(cache_seqlens)`` with int32 ``[b]`` lengths *including the tokens of this step*,
      ``b <= max_batch``. Rows ``b..max_batch-1`` get length 0 (nothing read, output 0, lse +inf). Planning
      runs the scheduler on the device (no host sync on an sm90 GPU) into the static metadata buffers.
    * **Per layer**: ``run(q, kv_cache, block_table)`` with ``q [b, s_q, h_q, head_dim]`` (the planned ``b``),
      this layer's ``kv_cache [num_blocks, page_size, h_kv, head_dim]`` (first 512 columns are V) and
      ``block_table [b, <= max_blocks_per_seq]`` int32. Inputs are copied into the static buffers unless
      they already are them (pass ``decoder.q_buf[:b]`` / ``decoder.block_table[:b]`` to skip the copies, or
      ``None`` when they were written in place: no slices and no checks, the cheapest call);
      the decode always covers all ``max_batch`` rows. Returns views ``out[:b]`` and ``lse[:b]`` of the static
      outputs (also copied into ``out=`` / ``lse=`` when given). Every layer of a step reuses one plan.
    * **Launch cost.** On the kernel path the decode writes straight into ``out`` / ``lse`` and uses a split
      workspace the decoder owns (fp32, ``(max_batch + num_sm_parts) * h_kv * s_q * h_q / h_kv * 513`` words,
      allocated at the first ``run``). The prepared launch arguments are kept per KV-cache tensor (by address,
      shape, strides and dtype: a cache seen before is not checked again, any other is), so a repeated ``run``
      makes no torch calls besides the input copies: two kernel launches and the checks of q and block_table.
      Consequences: one decoder serves one stream at a time (the workspace is shared), and the decode variant
      (``CUTEMLA_DECODE_SCHEDULE``, ``CUTEMLA_L2_PREFETCH``) is fixed at a cache's first ``run``.
    * **CUDA graphs.** Capture ``plan`` and the ``run`` of every layer in one graph (compile kernels before
      capture: one eager step, or ``python -m cutemla.kernels.warmup``). Between replays an engine may change,
      in place: the *values* of the seqlens tensor passed to ``plan`` (or of ``decoder.cache_seqlens`` when
      ``plan()`` is captured without arguments), of the block-table tensor passed to ``run`` (or of
      ``decoder.block_table``), of q, and of the KV caches (new tokens written, new pages assigned). It may
      not change any shape, dtype, device, the live batch ``b`` (capture one graph per batch bucket and pad,
      padded rows with length 0) or the tensors' storage. Replays recompute the schedule from the current
      lengths, so lengths can grow freely up to ``max_blocks_per_seq * page_size``.
    * Block-table entries past a request's needed pages are never read and may hold anything.
    """

    def __init__(self, max_batch: int, s_q: int, h_q: int, h_kv: int, page_size: int = 64,
                 dtype: torch.dtype = torch.bfloat16, device="cuda", num_sms: Optional[int] = None, *,
                 max_blocks_per_seq: int = 64, head_dim: int = 576, causal: bool = True,
                 softmax_scale: Optional[float] = None):
        for name, value in (("max_batch", max_batch), ("s_q", s_q), ("h_q", h_q), ("h_kv", h_kv),
                            ("page_size", page_size), ("max_blocks_per_seq", max_blocks_per_seq)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if h_q % h_kv:
            raise ValueError(f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_batch, self.s_q, self.h_q, self.h_kv = max_batch, s_q, h_q, h_kv
        self.page_size, self.dtype, self.head_dim = page_size, dtype, head_dim
        self.max_blocks_per_seq = max_blocks_per_seq
        self.causal = bool(causal) and s_q > 1
        self.softmax_scale = check_softmax_scale(softmax_scale, head_dim)
        self.num_sms = ops.default_num_sms(self.device) if num_sms is None else num_sms
        self.num_sm_parts = num_sm_parts(self.num_sms, s_q, h_q, h_kv)

        dev, i32 = self.device, torch.int32
        self.cache_seqlens = torch.zeros(max_batch, dtype=i32, device=dev)
        self.block_table = torch.zeros(max_batch, max_blocks_per_seq, dtype=i32, device=dev)
        self.q_buf = torch.zeros(max_batch, s_q, h_q, head_dim, dtype=dtype, device=dev)
        self.tile_scheduler_metadata = torch.zeros(self.num_sm_parts, SCHED_META_ROW_WORDS, dtype=i32, device=dev)
        self.num_splits = torch.zeros(max_batch + 1, dtype=i32, device=dev)
        self.out = torch.zeros(max_batch, s_q, h_q, D_V, dtype=dtype, device=dev)
        self.lse = torch.full((max_batch, h_q, s_q), float("inf"), dtype=torch.float32, device=dev)
        self.batch: Optional[int] = None  # live batch of the current plan
        self._uses_kernel: Optional[bool] = None  # decided at the first run (the backend choice is lazy)
        self._launches: dict = {}  # (kv_cache address, shape, strides) -> prepared kernel launches
        self._workspace: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._views: dict = {}  # batch -> (out[:b], lse[:b])
        self._live_views: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # _views[batch] of the plan
        self._expect_q: Optional[torch.Size] = None  # q's shape under the plan
        # Static addresses: an input at one of them is the static buffer itself (no copy).
        self._q_ptr, self._block_table_ptr = self.q_buf.data_ptr(), self.block_table.data_ptr()

    # ------------------------------------------------------------------------------------------------------

    def plan(self, cache_seqlens: Optional[torch.Tensor] = None) -> None:
        """Schedule this step from the lengths (int32 ``[b]``, ``b <= max_batch``) into the static buffers.

        ``cache_seqlens=None`` plans from ``self.cache_seqlens`` as the engine left it (live batch = max_batch).
        """
        if cache_seqlens is None:
            batch = self.max_batch
        else:
            if not isinstance(cache_seqlens, torch.Tensor):
                raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
            if cache_seqlens.dim() != 1 or not 1 <= cache_seqlens.shape[0] <= self.max_batch:
                raise ValueError(f"cache_seqlens must be [b] with 1 <= b <= max_batch={self.max_batch}, "
                                 f"got shape {tuple(cache_seqlens.shape)}")
            if cache_seqlens.dtype != torch.int32:
                raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
            if cache_seqlens.device != self.device:
                raise ValueError(f"cache_seqlens is on {cache_seqlens.device}, the decoder on {self.device}")
            batch = cache_seqlens.shape[0]
            if cache_seqlens.data_ptr() != self.cache_seqlens.data_ptr():
                self.cache_seqlens[:batch].copy_(cache_seqlens)
            if batch < self.max_batch:
                self.cache_seqlens[batch:].zero_()
        meta, splits = ops.sched_meta(self.cache_seqlens, self.s_q, self.h_q, self.h_kv, self.num_sms)
        self.tile_scheduler_metadata.copy_(meta)
        self.num_splits.copy_(splits)
        self.batch = batch
        self._expect_q = torch.Size((batch, self.s_q, self.h_q, self.head_dim))
        views = self._views.get(batch)
        if views is None:
            views = self._views[batch] = (self.out[:batch], self.lse[:batch])
        self._live_views = views

    def run(self, q: Optional[torch.Tensor], kv_cache: torch.Tensor, block_table: Optional[torch.Tensor],
            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode one layer with the current plan; returns ``(out [b, s_q, h_q, 512], lse [b, h_q, s_q])``.

        ``q=None`` / ``block_table=None``: the static ``q_buf`` / ``block_table`` already hold this layer's
        inputs (an engine that writes them in place skips the two slices and their checks).
        """
        batch = self.batch
        if batch is None:
            raise RuntimeError("MLADecoder.run called before plan(cache_seqlens)")
        if q is not None:
            self._check_q(q)
        if block_table is not None:
            self._check_block_table(block_table, batch)
        if self._uses_kernel is None:
            self._uses_kernel = ops._uses_kernel(self.device)
        launches = self._kernel_launches(kv_cache) if self._uses_kernel else self._check_kv_cache(kv_cache)
        # Every input checked: now the copies (skipped for the static buffers themselves).
        if q is not None and q.data_ptr() != self._q_ptr:
            self.q_buf[:batch].copy_(q)
        if block_table is not None and block_table.data_ptr() != self._block_table_ptr:
            self.block_table[:batch, :block_table.shape[1]].copy_(block_table)
        if launches is not None:
            kernels.launch(*launches, self.device.index)
        else:
            full_out, full_lse = ops.mla_decode(self.q_buf, kv_cache, self.block_table, self.cache_seqlens,
                                                self.tile_scheduler_metadata, self.num_splits,
                                                self.softmax_scale, self.causal)
            self.out.copy_(full_out)
            self.lse.copy_(full_lse)
        out_view, lse_view = self._live_views
        if out is not None:
            out.copy_(out_view)
        if lse is not None:
            lse.copy_(lse_view)
        return (out if out is not None else out_view), (lse if lse is not None else lse_view)

    # Per-run checks. Each is a handful of attribute reads (~0.1-0.3 us each on the CPU machine, about twice
    # that on the H100 host), so they compare against tuples prepared by plan() instead of building new ones.

    def _check_q(self, q) -> None:
        if not isinstance(q, torch.Tensor) or q.shape != self._expect_q:
            raise ValueError(f"q must be {list(self._expect_q)} ([b, s_q, h_q, head_dim] of the plan), got "
                             f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
        self._check_dtype_device("q", q, self.dtype)

    def _check_block_table(self, block_table, batch: int) -> None:
        if (not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != batch
                or block_table.shape[1] > self.max_blocks_per_seq):
            raise ValueError(f"block_table must be [b={batch}, <= max_blocks_per_seq={self.max_blocks_per_seq}], "
                             f"got {tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else block_table}")
        self._check_dtype_device("block_table", block_table, torch.int32, "int32")

    def _check_kv_cache(self, kv_cache) -> None:  # returns None: the reference path has no launches
        expect_kv = (self.page_size, self.h_kv, self.head_dim)
        if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 4 or tuple(kv_cache.shape[1:]) != expect_kv:
            raise ValueError(f"kv_cache must be [num_blocks, {', '.join(map(str, expect_kv))}], got "
                             f"{tuple(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__}")
        self._check_dtype_device("kv_cache", kv_cache, self.dtype)

    def _check_dtype_device(self, name: str, t: torch.Tensor, dtype: torch.dtype, dtype_name=None) -> None:
        if t.dtype is not dtype:  # torch dtypes are singletons
            raise TypeError(f"{name} must be {dtype_name or dtype}, got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device}, the decoder on {self.device}")

    _MAX_CACHED_LAUNCHES = 1024  # KV caches remembered (a model has one per layer); then start over

    def _kernel_launches(self, kv_cache) -> tuple:
        """The decode + combine launches into the static buffers for this KV cache, prepared once.

        Keyed by the cache's address, shape, strides and dtype: a cache seen before with all four equal passed
        every check then (structure, dtype, TMA alignment), and its device is pinned by the address (the entry
        keeps that memory alive, so no tensor of another device can sit there), so it is not re-checked. Any
        other tensor (new address, a reshaped or re-typed view) goes through all checks first.
        """
        try:
            key = (kv_cache.data_ptr(), kv_cache.shape, kv_cache.stride(), kv_cache.dtype)
        except AttributeError:  # not a tensor: let the check name it
            key = None
        launches = self._launches.get(key)
        if launches is None:
            from cutemla.validation import validate_decode_inputs, validate_kernel_inputs

            self._check_kv_cache(kv_cache)
            shape = validate_decode_inputs(self.q_buf, kv_cache, self.block_table, self.cache_seqlens, D_V)
            validate_kernel_inputs(shape, self.q_buf, kv_cache)
            if self._workspace is None:
                rows = self.s_q * (self.h_q // self.h_kv)
                splits = self.max_batch + self.num_sm_parts
                self._workspace = (
                    torch.empty(splits, self.h_kv, rows, D_V, dtype=torch.float32, device=self.device),
                    torch.empty(splits, self.h_kv, rows, dtype=torch.float32, device=self.device))
            if len(self._launches) >= self._MAX_CACHED_LAUNCHES:
                self._launches.clear()
            launches = self._launches[key] = kernels.dense_decode_launches(
                self.q_buf, kv_cache, self.block_table, self.cache_seqlens, self.tile_scheduler_metadata,
                self.num_splits, self.softmax_scale, self.causal, self.out, self.lse, *self._workspace)
        return launches
