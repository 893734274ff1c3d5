"""Triton kernels (MoE token permutation, zigzag context-parallel sharding) with plain-torch references.

This package has no dependency on ``mimo_titan``. Its kernels are added by the kernel issue; nothing is
exported yet.
"""
