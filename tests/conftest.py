"""Test set-up: 8 fake CPU devices (set before jax is imported), one compilation cache for the
session, and parsed absl flags."""
import os
import tempfile

# 8 fake CPU devices; and cheaper XLA CPU compilation (tests compile far more than they run):
# the legacy elemental emitters compile the tiny models' steps in ~40 % less time.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, shared by the xdist workers (which
# inherit this environment) and the subprocesses the tests start: a program compiles once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="t2s_jax_test_jit_cache_")
# Every program, however quick to compile: the subprocesses and runs of the tests share
# their small ones too (the eval step, the checkpoint's slices), which add up to minutes.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
