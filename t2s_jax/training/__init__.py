"""Training runs, one concern per module.

  control      RunError and its kinds; the one check of a --workdir (no jax: `t2s_jax.main`
               runs it before importing anything heavy)
  coordination what every process of a run agrees on: stop signals, the workdir lock
  train_state  the mesh, the train state (real or abstract) and the jitted step
  feeding      the run's datasets checked, training batches fed to the mesh
  evaluation   the evaluation pass and its files (in the loop)
  loop         `train_and_evaluate`: the training loop
  eval_mode    `--mode=eval`: evaluating saved checkpoints
  comparison   `compare_methods` / `compare_seeds`: several runs side by side
"""
