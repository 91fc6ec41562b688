"""Test setup: several fake CPU devices, strict dtype promotion, fp32 determinism."""

import os

import jax

# Several virtual CPU devices, so code paths that see the device count are exercised.
jax.config.update("jax_num_cpu_devices", 4)
# Implicit promotions (say float32 * float64 array) are bugs in a simulator; make them errors.
jax.config.update("jax_numpy_dtype_promotion", "strict")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
