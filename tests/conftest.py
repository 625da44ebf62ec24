"""Test set-up: 8 fake CPU devices (set before jax is imported) and parsed absl flags."""
import os

# 8 fake CPU devices; and cheaper XLA CPU compilation (tests compile far more than they run):
# the legacy elemental emitters compile the tiny models' steps in ~40 % less time.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
