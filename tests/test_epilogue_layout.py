"""The seesaw epilogue's staging tile (kernels/epilogue.py): its padded pitch keeps the shared stores conflict-free,
keeps every bulk-copy address 16-byte aligned, and fits a consumer's half of K stage 1. Pure arithmetic on the sm90
m64nN accumulator layout (kernels/softmax.py's docstring): thread t of a warpgroup (lane l of warp w) holds
rows 16w + l//4 (+ 8), value i in column 8*(i//4) + 2*(l%4) + i%2.
"""
import pytest

from cutemla.kernels.epilogue import STAGING_PITCH

BANKS, BANK_BYTES = 32, 4
STAGE_BYTES = 64 * 576 * 2  # K stage 1: 64 keys x 576 bf16/fp16 columns; each consumer stages in one half


def wavefronts(pitch_elems: int, elem_bytes: int, value: int) -> int:
    """Shared-memory wavefronts of one warp's store of column pair (value, value + 1) of its rows."""
    pair_bytes = 2 * elem_bytes
    lanes_per_phase = 32 if pair_bytes <= 4 else 128 // pair_bytes  # 8-byte stores: half a warp per phase
    total = 0
    for phase in range(32 // lanes_per_phase):
        words = {}  # bank -> distinct 4-byte words addressed in it
        for lane in range(phase * lanes_per_phase, (phase + 1) * lanes_per_phase):
            row = lane // 4 + ((value // 2) % 2) * 8
            col = (value // 4) * 8 + (lane % 4) * 2
            address = (row * pitch_elems + col) * elem_bytes
            for word in range(address // BANK_BYTES, (address + pair_bytes) // BANK_BYTES):
                words.setdefault(word % BANKS, set()).add(word)
        total += max(len(w) for w in words.values())
    return total


@pytest.mark.parametrize("elem_bytes", [2, 4], ids=["16bit", "fp32"])
def test_staging_stores_are_conflict_free(elem_bytes):
    ideal = 1 if elem_bytes == 2 else 2  # 128 bytes a warp for 16-bit pairs, 256 for fp32 pairs
    for value in range(0, 128, 2):  # a thread's 128 accumulator values of a 64 x 256 block, as pairs
        assert wavefronts(STAGING_PITCH, elem_bytes, value) == ideal, value


@pytest.mark.parametrize("elem_bytes", [2, 4], ids=["16bit", "fp32"])
def test_unpadded_pitch_would_conflict(elem_bytes):
    """The check above can fail: rows 256 elements apart share their banks."""
    assert wavefronts(256, elem_bytes, 0) >= 4


@pytest.mark.parametrize("elem_bytes,rows", [(2, 64), (4, 32)], ids=["16bit", "fp32"])
def test_staging_tile_fits_and_aligns(elem_bytes, rows):
    row_bytes = STAGING_PITCH * elem_bytes
    assert row_bytes % 16 == 0  # cp.async.bulk: 16-byte aligned source rows
    assert (256 * elem_bytes) % 16 == 0  # and a multiple of 16 bytes a copy
    assert rows * row_bytes <= STAGE_BYTES // 2  # consumer 1's tile starts at the half: no overlap
    assert (STAGE_BYTES // 2) % 16 == 0
    assert (64 * 576 * 2) % 1024 == 0  # stage 1 starts 1 KiB aligned (sK is), so both halves are 16-byte aligned
