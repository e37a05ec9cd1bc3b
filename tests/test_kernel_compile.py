"""Every decode-kernel config compiles for sm_90a on the CPU, as the Hopper design, with no spills.

Each compile runs in a child process (ptxas reports to stderr there); see cutemla.kernels.ptx_report.
"""
import pytest

from cutemla.kernels.ptx_report import run_report

DECODE_CONFIGS = [f"{dt}_d{d}_{schedule}" for dt in ("bf16", "fp16") for d in (576, 512)
                  for schedule in ("pipelined", "split_s")]


@pytest.fixture(scope="module", params=DECODE_CONFIGS)
def decode_report(request):
    return request.param, run_report("cutemla.kernels.decode", request.param)


def test_decode_compiles_to_hopper_design(decode_report):
    config, report = decode_report
    ptx = report["ptx"]
    subtiles = 9 if "_d576" in config else 8
    assert report["kernels"] == 1
    assert ptx["target_sm90a"] == 1
    # QK^T: 4 k16 steps per 64-column sub-tile over this warpgroup's 32 keys (pipelined has two
    # issue sites: the prologue and the loop); PV: 4 k16 steps of m64n256 per warpgroup.
    qk_sites = 2 if config.endswith("pipelined") else 1
    assert ptx["wgmma_m64n32k16"] == 4 * subtiles * qk_sites
    assert ptx["wgmma_m64n256k16"] == 4
    # Q as one copy of `subtiles` boxes, K as one box per sub-tile; L2 prefetch of later pages.
    assert ptx["tma_load"] == 2 * subtiles
    assert ptx["tma_prefetch"] == subtiles
    assert ptx["setmaxnreg"] == 2


def test_decode_has_no_spills_or_serialisation(decode_report):
    _, report = decode_report
    assert report["spill_bytes"] == 0
    assert report["stack_bytes"] == 0
    assert report["ptx"]["local_memory"] == 0
    # C7508: setmaxnreg ignored; C7519/C7510: WGMMA serialised by the compiler.
    assert not set(report["ptxas_warnings"]) & {"C7508", "C7510", "C7519"}, report["ptxas_warnings"]


SEESAW_CONFIGS = ["bf16_d576_seesaw", "fp16_d576_seesaw", "bf16_d576_seesaw_pf", "bf16_d576_seesaw_named",
                  "bf16_d576_seesaw_exact", "bf16_d576_seesaw_r224"]


@pytest.fixture(scope="module", params=SEESAW_CONFIGS)
def seesaw_report(request):
    return request.param, run_report("cutemla.kernels.seesaw", request.param)


def test_seesaw_compiles_to_hopper_design(seesaw_report):
    config, report = seesaw_report
    ptx = report["ptx"]
    assert report["kernels"] == 1 and ptx["target_sm90a"] == 1
    # QK^T as m64n64 over 9 sub-tiles x 4 k16 steps at four issue sites (each consumer's first
    # tile and its loop); PV as m64n256, 4 k16 steps at four sites (each consumer's own P from
    # registers and the other's from smem).
    assert ptx["wgmma_m64n64k16"] == 4 * 36
    assert ptx["wgmma_m64n32k16"] == 0
    assert ptx["wgmma_m64n256k16"] == 4 * 4
    # K: 9 sub-tile boxes per stage, one producer warp per stage; Q: 9 boxes in one copy.
    assert ptx["tma_load"] == 3 * 9
    assert ptx["tma_prefetch"] == (18 if config.endswith("_pf") else 0)
    assert ptx["setmaxnreg"] == 2
    # The epilogue stages O in K stage 1 and writes whole rows by bulk copy (kernels/epilogue.py): per consumer
    # one site for `out` and two for the fp32 partials (rows 0-31, then 32-63). Only the LSE goes by
    # st.global (out and the partial, two rows per quad leader of consumer 0).
    assert ptx["bulk_store"] == 2 * 3
    assert ptx["st_global"] <= 4


def test_seesaw_has_no_spills_or_serialisation(seesaw_report):
    _, report = seesaw_report
    # The 8-byte spill this once allowed was consumer 0's epilogue (per-element 64-bit output
    # addresses); per-row bases with column-pair stores removed it, and the staged epilogue keeps none.
    assert report["spill_bytes"] == 0 and report["stack_bytes"] == 0, report
    assert report["ptx"]["local_memory"] == 0
    assert not set(report["ptxas_warnings"]) & {"C7508", "C7510", "C7519"}, report["ptxas_warnings"]
