"""Triton helpers shared by the kernels of this package."""
import triton
import triton.language as tl


@triton.jit
def cast_to(v, ptr):
    """v (fp32) in the element type of ptr; bfloat16 rounded to nearest even by hand, so the CPU interpreter
    (whose cast truncates) rounds as the GPU and torch do."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ptr.dtype.element_ty)
