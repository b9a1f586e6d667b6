"""Test session setup.

Triton decides when a kernel is *decorated* whether it runs in its CPU interpreter, so
``TRITON_INTERPRET=1`` must be set before anything imports triton: kernel tests then run on CPU.
The ops still take the plain-torch reference on CPU unless ``XQUANT_FORCE_KERNELS=1`` (set by the
tests that want the kernel path through the ops).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
# The tests' models are tiny: one intra-op thread is faster than two on the 2-core CI machine, where
# a second thread competes with Inductor's compile workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch._inductor.config as _inductor_config  # noqa: E402

# Inductor's CPU code: scalar C++ (no SIMD variants) compiles about twice as fast, and the tests'
# models are tiny; what they check (tokens, graph contents) does not depend on vector width.
_inductor_config.cpp.simdlen = 0
