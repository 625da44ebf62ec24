"""Start-up: JAX's persistent compilation cache as `t2s_jax.main` sets it up."""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

# Compiles one program in a fresh process and prints how the persistent cache answered.
_PROGRAM = """
import sys
import jax, jax.numpy as jnp
from jax import monitoring
from t2s_jax import main
events = []
monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
print("cache dir:", main.enable_compilation_cache(sys.argv[1]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this program compiles fast
jax.jit(lambda x: jnp.sin(x) * 2.0 + jnp.cos(x[::-1])).lower(jnp.ones(1000)).compile()
print("hits:", events.count("/jax/compilation_cache/cache_hits"))
"""


def _run(workdir, cache_dir_variable=None):
    environment = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    environment["PYTHONPATH"] = tiny.REPO
    if cache_dir_variable is not None:
        environment["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir_variable)
    completed = subprocess.run(
        [sys.executable, "-c", _PROGRAM, str(workdir)], env=environment, cwd=tiny.REPO,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout


def test_second_process_reads_the_compiled_program_from_the_workdir_cache(tmp_path):
    first = _run(tmp_path)
    assert f"cache dir: {tmp_path / 'jax_cache'}" in first and "hits: 0" in first
    assert os.listdir(tmp_path / "jax_cache")  # the entry was written
    assert "hits: 0" not in _run(tmp_path)  # the same program, read back
    # An explicit JAX_COMPILATION_CACHE_DIR (a cache shared by runs) wins over the workdir's.
    shared = tmp_path / "shared"
    assert f"cache dir: {shared}" in _run(tmp_path / "other_run", cache_dir_variable=shared)
    assert os.listdir(shared) and not (tmp_path / "other_run" / "jax_cache").exists()
