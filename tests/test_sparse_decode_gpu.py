"""The sparse (top-k) FP8 decode kernel against the PyTorch reference, on an sm90 GPU.

Cases follow FlashMLA's tests/test_flash_mla_sparse_decoding.py (d_qk 576, h_q 64/128, topk 64..2048, page
sizes 64 / odd, s_q 1-3, ~20% invalid (-1) slots, attn_sink with +-inf entries, sm_scale = d_qk ** -0.55) plus
cutemla's extras: h_q 16/32 (tensor-parallel ranks), topk_length, topk not a multiple of 64, non-contiguous
inputs, all-invalid rows, and out-of-range ids (masked on the device, never read). Every cache token that no
valid slot names is poisoned with 0xFF bytes (NaN in all fields), so a kernel that reads one fails.

Tolerances: out abs 1e-3 (FlashMLA's sparse test) or rel 2.01/128, cosine diff 5e-6; lse FlashMLA's dense ones.
Three kernel variants are compiled (sparse_fp8, sparse_fp8_pipelined, sparse_fp8_u8: ~15 s each on first use,
then the disk cache) plus the combine; the whole file should take about a minute on an H100:
    python -m pytest -q -m gpu tests/test_sparse_decode_gpu.py
"""
import dataclasses
import math

import pytest
import torch

from cutemla import flash_mla_with_kvcache, get_mla_metadata
from cutemla.layouts.fp8_cache import FP8_BYTES_PER_TOKEN, quantize_fp8_cache
from cutemla.reference_sparse import sparse_mla_decode_reference
from cutemla.testing import LSE_TOL, assert_close_flashmla

pytestmark = pytest.mark.gpu

D_QK = 576
SM_SCALE = D_QK ** -0.55
GARBAGE_ID = 2147480000
SPARSE_OUT_TOL = dict(abs_tol=1e-3, rel_tol=2.01 / 128, cos_diff_tol=5e-6)


@dataclasses.dataclass(frozen=True)
class SparseCase:
    b: int
    s_q: int
    h_q: int
    topk: int
    page: int = 64
    s_kv: int = 0  # cache tokens (0: 2 * topk)
    invalid_frac: float = 0.2
    sink: bool = True
    topk_length: bool = False
    empty_row: bool = False
    out_of_range: bool = False  # ids past the cache (and < -1) in live slots: masked like -1 on the device
    noncontig: bool = False
    seed: int = 0

    def __str__(self):
        flags = "".join(f"-{name}" for name in ("topk_length", "empty_row", "out_of_range", "noncontig")
                        if getattr(self, name))
        return (f"b{self.b}-sq{self.s_q}-h{self.h_q}-topk{self.topk}-page{self.page}"
                f"{'-sink' if self.sink else ''}{flags}")


def make_inputs(case: SparseCase, device="cuda"):
    gen = torch.Generator().manual_seed(case.seed)
    b, s_q, h_q, topk, page = case.b, case.s_q, case.h_q, case.topk, case.page
    num_tokens = case.s_kv or 2 * topk
    num_blocks = -(-num_tokens // page) + 1
    bf16_cache = (torch.randn(num_blocks, page, 1, D_QK, generator=gen) / 10).clamp(-1, 1).to(torch.bfloat16)
    packed = quantize_fp8_cache(bf16_cache)
    q = (torch.randn(b, s_q, h_q, D_QK, generator=gen) / 10).clamp(-1, 1).to(torch.bfloat16)
    indices = torch.randint(0, num_blocks * page, (b, s_q, topk), generator=gen, dtype=torch.int32)
    indices[torch.rand(b, s_q, topk, generator=gen) < case.invalid_frac] = -1
    if case.empty_row:
        indices[0, -1] = -1
    valid = indices != -1
    topk_length = None
    if case.topk_length:
        topk_length = torch.randint(0, topk + 1, (b,), generator=gen, dtype=torch.int32)
        topk_length[0] = topk
        if b > 1:
            topk_length[1] = 0
        if b > 2:
            topk_length[2] = min(topk, 65)
        masked = torch.arange(topk).view(1, 1, topk) >= topk_length.view(b, 1, 1).long()
        garbage = torch.where(torch.rand(b, s_q, topk, generator=gen) < 0.5, GARBAGE_ID, -7).to(torch.int32)
        indices = torch.where(masked, garbage, indices)
        valid &= ~masked
    used = torch.zeros(num_blocks * page, dtype=torch.bool)
    used[indices[valid].long()] = True
    packed.view(-1, FP8_BYTES_PER_TOKEN)[~used] = 0xFF  # NaN everywhere no valid slot points
    ref_indices = indices
    if case.out_of_range:
        bad = (torch.rand(b, s_q, topk, generator=gen) < 0.1) & valid
        wild = torch.where(torch.rand(b, s_q, topk, generator=gen) < 0.5, num_blocks * page, -5).to(torch.int32)
        indices = torch.where(bad, wild, indices)
        ref_indices = torch.where(bad, torch.full_like(indices, -1), indices)
    sink = None
    if case.sink:
        sink = torch.randn(h_q, generator=gen) * 2
        sink[0], sink[-1] = math.inf, -math.inf

    q, packed, indices = q.to(device), packed.to(device), indices.to(device)
    if case.noncontig:  # q rows 640 wide, cache blocks one token longer, indices a slice of a wider tensor
        q = torch.cat([q, torch.zeros(b, s_q, h_q, 64, dtype=q.dtype, device=device)], -1)[..., :D_QK]
        padded = torch.zeros(num_blocks, page + 1, 1, FP8_BYTES_PER_TOKEN, dtype=torch.uint8, device=device)
        padded[:, :page] = packed
        packed = padded[:, :page]
        indices = torch.cat([indices, torch.full_like(indices, 7)], -1)[..., :topk]
    to = (lambda t: None if t is None else t.to(device))
    return q, packed, indices, ref_indices.to(device), to(sink), to(topk_length)


@pytest.fixture
def kernel_backend(clean_api_state, monkeypatch):
    monkeypatch.setenv("CUTEMLA_BACKEND", "kernel")


def run_case(case: SparseCase, num_splits=None, config=None):
    """Through the API (splits chosen by shape), or the launcher directly with a forced split count / config."""
    q, packed, indices, ref_indices, sink, topk_length = make_inputs(case)
    if num_splits is None and config is None:
        out, lse = flash_mla_with_kvcache(q, packed, None, None, 512, get_mla_metadata()[0],
                                          softmax_scale=SM_SCALE, is_fp8_kvcache=True, indices=indices,
                                          attn_sink=sink, topk_length=topk_length)
    else:
        from cutemla.kernels.sparse_decode import run_sparse_fp8_decode

        kwargs = {} if config is None else {"config": config}
        out, lse = run_sparse_fp8_decode(q, packed, indices, SM_SCALE, attn_sink=sink, topk_length=topk_length,
                                         num_splits=num_splits, **kwargs)
    ref_out, ref_lse = sparse_mla_decode_reference(q, packed, ref_indices, SM_SCALE, attn_sink=sink,
                                                   topk_length=topk_length)
    torch.cuda.synchronize()
    assert out.shape == (case.b, case.s_q, case.h_q, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (case.b, case.h_q, case.s_q) and lse.dtype == torch.float32
    assert_close_flashmla("out", out.float(), ref_out.float(), **SPARSE_OUT_TOL)
    assert_close_flashmla("lse", lse, ref_lse, **LSE_TOL)
    return out, lse


CASES = [
    # FlashMLA's V3.2 sweep, scaled down: h_q 64/128, (s_kv, topk, page) shapes, s_q 1-3, sink on.
    SparseCase(b=4, s_q=1, h_q=64, topk=64, page=64, s_kv=512),
    SparseCase(b=4, s_q=3, h_q=128, topk=64, page=69, s_kv=512),
    SparseCase(b=6, s_q=1, h_q=64, topk=576, page=61, s_kv=1024),
    SparseCase(b=6, s_q=2, h_q=128, topk=576, page=2, s_kv=1024),
    SparseCase(b=4, s_q=2, h_q=64, topk=2048, page=64, s_kv=2046),
    SparseCase(b=4, s_q=1, h_q=128, topk=2048, page=576, s_kv=2046),
    SparseCase(b=16, s_q=2, h_q=128, topk=128, page=64),
    # Tensor-parallel head counts, which FlashMLA lacks.
    SparseCase(b=8, s_q=2, h_q=16, topk=512, page=64),
    SparseCase(b=8, s_q=1, h_q=32, topk=1024, page=64, sink=False),
    # topk_length (MODEL1 semantics; masked slots hold garbage ids), topk not a multiple of 64.
    SparseCase(b=5, s_q=2, h_q=64, topk=256, topk_length=True),
    SparseCase(b=3, s_q=1, h_q=128, topk=100, page=64, topk_length=True),
    SparseCase(b=3, s_q=2, h_q=16, topk=200, page=64),
    # Corners: a row with no valid slot, ids outside the cache, non-contiguous inputs.
    SparseCase(b=2, s_q=2, h_q=64, topk=128, empty_row=True),
    SparseCase(b=4, s_q=2, h_q=128, topk=320, out_of_range=True),
    SparseCase(b=3, s_q=2, h_q=64, topk=192, page=64, noncontig=True, topk_length=True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sparse_decode_matches_reference(kernel_backend, case):
    run_case(case)


# On 132 SMs the API picks 1 split for most CASES and 2-8 for the topk 576-2048 ones; force both paths on
# the features that interact with splitting (sink applied in the split combine, topk_length emptying splits).
FORCED = [
    (SparseCase(b=5, s_q=2, h_q=64, topk=256, topk_length=True, seed=1), 3),
    (SparseCase(b=3, s_q=2, h_q=128, topk=200, topk_length=True, seed=2), 4),
    (SparseCase(b=2, s_q=2, h_q=32, topk=1024, empty_row=True, seed=3), 5),
    (SparseCase(b=2, s_q=1, h_q=64, topk=2048, seed=4), 1),
]


@pytest.mark.parametrize("case,num_splits", FORCED, ids=[f"{c}-splits{n}" for c, n in FORCED])
def test_forced_splits(case, num_splits):
    run_case(case, num_splits)


# The pipelined consumer schedule (QK^T of tile n+1 before PV of tile n), a second compiled variant.
PIPELINED = [CASES[1], CASES[4], CASES[7], CASES[9], CASES[10], CASES[12], CASES[13]]


@pytest.mark.parametrize("case", PIPELINED, ids=str)
def test_pipelined_schedule(case):
    run_case(case, config="sparse_fp8_pipelined")
    run_case(case, num_splits=3, config="sparse_fp8_pipelined")


@pytest.mark.parametrize("case", [CASES[4], CASES[13]], ids=str)
def test_eight_tokens_in_flight(case):
    run_case(case, config="sparse_fp8_u8")


def test_all_invalid_gives_zero_and_inf(kernel_backend):
    case = SparseCase(b=2, s_q=2, h_q=64, topk=128, invalid_frac=1.0)
    out, lse = run_case(case)
    assert torch.all(out == 0) and torch.all(torch.isinf(lse) & (lse > 0))


def test_repeatable_and_graph_capturable(kernel_backend):
    case = SparseCase(b=8, s_q=2, h_q=128, topk=512)
    q, packed, indices, _, sink, _ = make_inputs(case)

    def call():
        return flash_mla_with_kvcache(q, packed, None, None, 512, get_mla_metadata()[0], softmax_scale=SM_SCALE,
                                      is_fp8_kvcache=True, indices=indices, attn_sink=sink)

    first = call()
    for _ in range(3):
        again = call()
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(first[0], captured[0]) and torch.equal(first[1], captured[1])
