"""Every sparse / dense FP8 decode config compiles for sm_90a on the CPU, as the Hopper design, with no spills.

Each compile runs in a child process (ptxas reports to stderr there); see cutemla.kernels.ptx_report.
"""
import pytest

from cutemla.kernels import ptx_report

# Gather / dequant markers on top of ptx_report's own (added for these reports only).
GATHER_MARKERS = {
    "ld_global_v4": r"ld\.global(?:\.nc)?\.v4\.",  # 16-byte token loads
    "st_shared_v4": r"st\.shared\.v4\.",  # 16-byte stores of dequantised bf16 into the swizzled K tile
    "cvt_e4m3x2": r"cvt\.rn\.f16x2\.e4m3x2",  # fp8 pairs -> f16 pairs
    "mul_bf16x2": r"mul\.rn\.bf16x2",  # packed dequant: two bf16x2 multiplies per e4m3 pair
    "div_s32": r"\bdiv\.s32",  # token id -> page (a runtime page size): per token, or per lane with lane_rows
    "fence_proxy_async": r"fence\.proxy\.async",
    "prefetch_l2": r"prefetch\.global\.L2",
    "vote_ballot": r"vote\.sync\.ballot",
}

# (module, config): the sparse kernel and the dense-FP8 kernel built from the same pieces.
CONFIGS = [("sparse_decode", c) for c in ("sparse_fp8", "sparse_fp8_pipelined", "sparse_fp8_noprefetch",
                                          "sparse_fp8_u2", "sparse_fp8_u8", "sparse_fp8_packed",
                                          "sparse_fp8_pipelined_packed", "sparse_fp8_u8_packed")] + \
          [("dense_fp8_decode", c) for c in ("dense_fp8", "dense_fp8_noprefetch", "dense_fp8_packed",
                                             "dense_fp8_u8_packed")]


@pytest.fixture(scope="module", params=CONFIGS, ids=[c for _, c in CONFIGS])
def sparse_report(request):
    module, config = request.param
    with pytest.MonkeyPatch.context() as mp:
        for name, pattern in GATHER_MARKERS.items():
            mp.setitem(ptx_report.PTX_MARKERS, name, pattern)
        return config, ptx_report.run_report(f"cutemla.kernels.{module}", config)


def test_sparse_compiles_to_hopper_design(sparse_report):
    config, report = sparse_report
    ptx = report["ptx"]
    assert report["kernels"] == 1
    assert ptx["target_sm90a"] == 1
    # QK^T: 36 k16 steps of m64n32 (this warpgroup's 32 keys over d = 576; the pipelined schedule has two
    # issue sites, prologue and loop); PV: 4 steps of m64n256.
    assert ptx["wgmma_m64n32k16"] == (72 if "pipelined" in config else 36)
    assert ptx["wgmma_m64n256k16"] == 4
    # Q is the only TMA load (9 boxes of 64 columns); the cache is gathered with vector loads.
    assert ptx["tma_load"] == 9
    assert ptx["setmaxnreg"] == 2
    # Per producer warp and 64-slot tile: 16 tokens x (NoPE + scale + RoPE) loads, the NoPE one a 16-byte
    # vector per lane (scale and RoPE pair: 4 bytes per lane); 16 x 8 e4m3x2 converts; 16 x 2 16-byte stores
    # of dequantised NoPE (+ 16 4-byte RoPE stores).
    assert ptx["ld_global_v4"] == 16
    assert ptx["st_shared_v4"] == 32
    # The packed producer converts by bit placement and bf16x2 multiplies (2 per pair) instead.
    packed = config.endswith("packed")
    assert ptx["cvt_e4m3x2"] == (0 if packed else 128)
    assert ptx["mul_bf16x2"] == (256 if packed else 0)
    if packed and config.startswith("sparse"):
        # lane_rows: one token id -> page division per lane in the gather and one in the prefetch (the
        # default divides every token: 16 + 3), plus the split plan's two.
        assert ptx["div_s32"] == 4
    assert ptx["fence_proxy_async"] >= 1  # generic smem stores -> async proxy (WGMMA) before the arrive
    assert ptx["vote_ballot"] == 1
    assert ptx["prefetch_l2"] == (0 if config.endswith("noprefetch") else 3)


def test_sparse_has_no_spills_or_serialisation(sparse_report):
    _, report = sparse_report
    assert report["spill_bytes"] == 0
    assert report["stack_bytes"] == 0
    assert report["ptx"]["local_memory"] == 0
    assert not set(report["ptxas_warnings"]) & {"C7508", "C7510", "C7519"}, report["ptxas_warnings"]


def test_sparse_combine_compiles_without_spills():
    report = ptx_report.run_report("cutemla.kernels.sparse_combine", "sparse_combine")
    assert report["kernels"] == 1 and report["ptx"]["target_sm90a"] == 1
    assert report["spill_bytes"] == 0 and report["stack_bytes"] == 0 and report["ptx"]["local_memory"] == 0
