"""One process of a multi-process step check (run by tests/test_multiprocess.py).

Every process builds the tiny T2S-DA run, starts `jax.distributed` with the flags of
`python -m t2s_jax.main`, and trains on the real input pipeline (`data.make_train_iterator`
with its process index and count), whose global batch of a step is the same whatever the
topology: process p contributes rows [p * B/P, (p + 1) * B/P). After the steps it saves a
run checkpoint (Orbax, all processes cooperating) and, with --restore_from, restores
another run's checkpoint onto its own mesh. Process 0 writes the losses to
<workdir>/result.json, the assembled global batches to <workdir>/batches.npz and the
restored parameters to <workdir>/restored_params.npz. `--delay_first_step_s` makes this
process late for the steps' first collective (one process compiling while the others
loaded their programs from the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny  # noqa: E402

from t2s_jax import checkpointing, data, parallel  # noqa: E402
from t2s_jax.training import train_state  # noqa: E402

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
    "pull.num_groups": GLOBAL_BATCH,  # the pulling loss's sampling groups: one per device of the 4-device runs
}


def _max_abs_diff(tree_a, tree_b) -> float:
    return max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator_address", default="")
    parser.add_argument("--num_processes", type=int, default=0)
    parser.add_argument("--process_id", type=int, default=-1)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", required=True, help="where the test prepared the synthetic pair")
    parser.add_argument("--restore_from", default="", help="a run dir whose latest checkpoint to restore")
    parser.add_argument("--delay_first_step_s", type=float, default=0.0, help="sleep before the first step")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    config = tiny.tiny_config(args.data_dir, "t2s", **OVERRIDES)
    mesh = parallel.make_mesh()
    graphdef, state, imagenet_variables, optimizer = train_state.create_train_state(config, mesh, NUM_STEPS)
    step_fn = train_state.jit_train_step(config, graphdef, optimizer, mesh, NUM_STEPS)

    initial_params = parallel.to_host(state.params)
    iterator = data.make_train_iterator(
        config.data, seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count()
    )
    losses, batches = [], []
    time.sleep(args.delay_first_step_s)
    for step in range(NUM_STEPS):
        batch = parallel.global_batch(next(iterator), mesh)
        gather_start = time.perf_counter()
        batches.append(parallel.to_host(batch))  # the assembled global batch, whole on every process
        if step == 0:  # the first collective of the steps: here an early process waits for a late one
            first_gather_s = time.perf_counter() - gather_start
        state, metrics = step_fn(state, batch, imagenet_variables)
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
        "first_gather_s": first_gather_s,
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
        np.savez(
            os.path.join(args.workdir, "batches.npz"),
            **{f"{step}/{key}": value for step, batch in enumerate(batches) for key, value in batch.items()},
        )
        with open(os.path.join(args.workdir, "result.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
