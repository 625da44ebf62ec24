"""One process of a multi-process step check (run by tests/test_multiprocess.py).

Every process builds the tiny T2S-DA run, starts `jax.distributed` with the flags of
`python -m t2s_jax.main`, and feeds the SAME global batches whatever the topology: each
global batch is drawn from the step's seed, and process p contributes rows
[p * B/P, (p + 1) * B/P). After the steps it saves a run checkpoint (Orbax, all processes
cooperating) and, with --restore_from, restores another run's checkpoint onto its own
mesh. Process 0 writes the losses to <workdir>/result.json and the restored parameters
to <workdir>/restored_params.npz.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny  # noqa: E402

from t2s_jax import bench, checkpointing, parallel, train  # noqa: E402

NUM_STEPS = 3
GLOBAL_BATCH = 4
# Shared with the test's `python -m t2s_jax.main` run. No warmup, so parameters move from
# step 1; a learning rate small enough that the pulling loss's discrete choices (pseudo-label
# argmax, confidence percentile) stay the same across topologies: with the demo's 6e-4,
# reduction-order rounding amplified by Adam flips some of them by step 2, and the runs part.
OVERRIDES = {
    "data.batch_size": GLOBAL_BATCH,
    "data.source": "synthetic_city/source_64x128",
    "data.target": "synthetic_city/target_64x128",
    "data.eval_dataset": "synthetic_city/target_64x128",
    "data.source_resize_hw": (64, 128),
    "data.target_resize_hw": (64, 128),
    "optim.warmup_steps": 0,
    "optim.learning_rate": 6e-6,
    "train.num_steps": NUM_STEPS,
    "train.eval_every": NUM_STEPS,
    "train.checkpoint_every": NUM_STEPS,
}


def global_batch_for_step(config, step: int) -> dict[str, np.ndarray]:
    """The whole global batch of `step`: a pure function of the step, not of the topology."""
    return bench.synthetic_host_batch(config.data, config.model.num_classes, seed=1000 + step)


def _max_abs_diff(tree_a, tree_b) -> float:
    return max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator_address", default="")
    parser.add_argument("--num_processes", type=int, default=0)
    parser.add_argument("--process_id", type=int, default=-1)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--restore_from", default="", help="a run dir whose latest checkpoint to restore")
    args = parser.parse_args()

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    config = tiny.tiny_config(os.path.join(args.workdir, "unused_data"), "t2s", **OVERRIDES)
    mesh = parallel.make_mesh()
    graphdef, state, imagenet_params, optimizer = train.create_train_state(config, mesh, NUM_STEPS)
    step_fn = train.jit_train_step(config, graphdef, optimizer, mesh, NUM_STEPS)

    initial_params = parallel.to_host(state.params)
    rows = GLOBAL_BATCH // jax.process_count()
    first = jax.process_index() * rows
    losses = []
    for step in range(NUM_STEPS):
        whole = global_batch_for_step(config, step)
        local = {key: value[first : first + rows] for key, value in whole.items()}
        state, metrics = step_fn(state, parallel.global_batch(local, mesh), imagenet_params)
        losses.append({key: float(value) for key, value in parallel.to_host(metrics).items()})

    checkpointer = checkpointing.RunCheckpointer(args.workdir)
    checkpointer.save(NUM_STEPS, state, {"batches": NUM_STEPS})  # no iterator here: a stand-in state
    checkpointer.close()

    final_params = parallel.to_host(state.params)
    result = {
        "processes": jax.process_count(),
        "devices": mesh.size,
        "losses": losses,
        "max_param_change": _max_abs_diff(final_params, initial_params),
    }
    if args.restore_from:
        other = checkpointing.RunCheckpointer(args.restore_from)
        restored, _, restored_step = other.restore(checkpointing.abstract_like(state))
        other.close()
        restored_params = parallel.to_host(restored.params)
        result["restored_step"] = restored_step
        result["restored_state_step"] = int(parallel.to_host(restored.step))
        if jax.process_index() == 0:  # the test compares them with its own restore
            np.savez(os.path.join(args.workdir, "restored_params.npz"), *jax.tree.leaves(restored_params))
    if jax.process_index() == 0:
        with open(os.path.join(args.workdir, "result.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
