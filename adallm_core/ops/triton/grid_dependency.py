"""The first statement of every decode kernel that may launch with programmatic dependent launch (ops/pdl.py)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def wait_for_prior_kernel(PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one has completed and its writes are visible, then let the next
    kernel's blocks be scheduled as this one's finish. Without: nothing (Ada, the interpreter)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
