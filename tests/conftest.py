"""Test set-up: 8 fake CPU devices (for sharding tests) before jax initialises."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:  # grain workers read absl flags
    from absl import flags as _absl_flags

    _absl_flags.FLAGS.mark_as_parsed()
except Exception:  # pragma: no cover
    pass
