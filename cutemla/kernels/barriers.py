"""Named barriers between warpgroups that run different code.

`cute.arch.barrier` and `cute.arch.barrier_arrive` emit PTX `bar.sync` / `bar.arrive`, the `.aligned` forms:
they promise that every thread taking part in a barrier executes the same barrier instruction. A
warp-specialised kernel whose warpgroups meet at a barrier from their own code paths (the seesaw's two
consumers, each specialised at trace time) breaks that promise. compute-sanitizer's synccheck reports it as
"Barrier error detected. Divergent thread(s) in block", and racecheck then does not count the barrier as
ordering the shared-memory accesses around it. The unaligned forms (`barrier.sync`, `barrier.arrive`) make no
such promise, so they are the correct instructions wherever the participants' barrier sites differ.

A barrier reached by every participant at one static site (one code path for both warpgroups, a
warpgroup-local barrier) may keep the aligned form.
"""
from __future__ import annotations

import cutlass.cute as cute
from cutlass import Int32
from cutlass._mlir.dialects import nvvm
from cutlass.cutlass_dsl import dsl_user_op


@dsl_user_op
def sync(barrier_id, number_of_threads, *, loc=None, ip=None) -> None:
    """Wait at named barrier `barrier_id` until `number_of_threads` threads arrived (unaligned)."""
    nvvm.barrier_cta_sync(Int32(barrier_id).ir_value(loc=loc, ip=ip),
                          thread_count=Int32(number_of_threads).ir_value(loc=loc, ip=ip),
                          aligned=False, loc=loc, ip=ip)


def arrive(barrier_id, number_of_threads) -> None:
    """Arrive at named barrier `barrier_id` without waiting (unaligned)."""
    cute.arch.barrier_arrive(barrier_id=barrier_id, number_of_threads=number_of_threads, aligned=False)
