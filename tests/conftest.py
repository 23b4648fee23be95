"""Test set-up: 8 fake CPU devices, so sharding tests run anywhere.

LLVM optimisation level 0 halves XLA:CPU compile time, which dominates these
tiny-model tests; it does not change float semantics (no fast-math either way).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
