"""The built-in demo: source-only, DAFormer and T2S-DA on the synthetic domain pair, on a CPU.

`python -m t2s_jax.main --config=configs/synthetic_demo.py --workdir=runs/demo` trains the three
methods one after the other on `synthetic_city/source` -> `synthetic_city/target` (generated on
first use, no download), evaluates each on the synthetic target's val split and prints their
per-class IoU side by side. A tiny MiT keeps it to minutes on 2 CPU cores.
"""

from t2s_jax import benchmarks


def get_config():
    return benchmarks.synthetic_demo()
