"""Test set-up: 8 fake CPU devices (for sharding tests) before jax initialises."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# The suite is dominated by XLA compile time of tiny models: skip the expensive CPU backend
# passes (about 35% less CPU time; the numerics under test do not depend on them).
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = flags.strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:  # grain workers read absl flags
    from absl import flags as _absl_flags

    _absl_flags.FLAGS.mark_as_parsed()
except Exception:  # pragma: no cover
    pass
