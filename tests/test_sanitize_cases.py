"""CPU checks of the compute-sanitizer driver (tests/sanitize_kernels.py, perf/sanitize.sh): it imports, lists its
cases, every case is valid for the kernel and crosses the hazard it is named for, and the shell script parses."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sanitize_kernels
from cutemla.schedule import get_decoding_sched_meta
from cutemla.testing import LSE_TOL, OUT_TOL, assert_close_flashmla, dense_attention_oracle
from cutemla.reference import mla_decode_reference
from cutemla.validation import validate_decode_inputs, validate_kernel_inputs
from random_inputs import build_inputs

ROOT = Path(__file__).resolve().parents[1]


def test_list_matches_cases():
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "sanitize_kernels.py"), "--list"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert out == sanitize_kernels.case_names() and len(out) >= 8
    assert {"fp8_sparse", "fp8_dense", "pipelined:partial_last_page", "split_s:split_and_unsplit"} <= set(out)


def test_schedule_prefix_is_checked():
    with pytest.raises(SystemExit):
        sanitize_kernels.main(["nonesuch:zero_lengths"])
    with pytest.raises(SystemExit):
        sanitize_kernels.main(["pipelined:fp8_dense"])  # a schedule applies to the dense cases only


def test_unknown_case_is_an_error():
    with pytest.raises(SystemExit):
        sanitize_kernels.main(["no_such_case"])


@pytest.mark.parametrize("name", list(sanitize_kernels.CASES))
def test_case_is_kernel_valid_and_reference_agrees(name):
    spec = sanitize_kernels.CASES[name]
    inputs = build_inputs(spec)
    shape = validate_decode_inputs(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512)
    validate_kernel_inputs(shape, inputs.q, inputs.kcache)
    out, lse = mla_decode_reference(inputs.q, inputs.kcache, inputs.block_table, inputs.cache_seqlens, 512,
                                    causal=spec.causal)
    expected_out, expected_lse = dense_attention_oracle(inputs, causal=spec.causal)
    assert_close_flashmla("out", out.float(), expected_out.float(), **OUT_TOL)
    assert_close_flashmla("lse", lse, expected_lse, **LSE_TOL)


def _splits(name):
    spec = sanitize_kernels.CASES[name]
    seqlens = torch.tensor(spec.seqlens, dtype=torch.int32)
    _, num_splits = get_decoding_sched_meta(seqlens, spec.s_q, spec.h_q, spec.h_kv)  # 132 SMs (H100 SXM)
    return (num_splits[1:] - num_splits[:-1]).tolist()


def test_cases_cross_their_hazards():
    cases = sanitize_kernels.CASES
    assert 0 in cases["zero_lengths"].seqlens and set(cases["all_zero"].seqlens) == {0}
    assert any(n % 64 for n in cases["partial_last_page"].seqlens)
    assert cases["causal_s_q2"].causal and cases["causal_s_q2"].s_q == 2
    assert cases["h_kv_gt1"].h_kv > 1 and cases["h_kv8_h_q128"].h_kv == 8
    assert _splits("split_one_long")[0] > 1
    mixed = _splits("split_and_unsplit")
    assert max(mixed) > 1 and min(mixed) == 1
    assert max(_splits("unsplit_many")) == 1
    assert cases["d512_fp16_views"].d == 512 and cases["d512_fp16_views"].dtype == torch.float16


def test_shell_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(ROOT / "perf" / "sanitize.sh")], check=True)
