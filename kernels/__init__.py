"""Triton kernels of anp_fast's perturbed ops (installed as anp_fast_kernels). They know nothing of the
engine; anp_fast.ops decides when they run."""
