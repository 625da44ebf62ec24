"""Orbax checkpoints: the only module that imports orbax (its API still moves).

A run checkpoint holds everything needed to continue exactly: the train state
(student, teacher, optimizer, step, RNG) and the data iterator's state. We keep the
last `keep` checkpoints plus the best one by mIoU.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

_STATE = "state"
_DATA = "data"
_preservation = ocp.checkpoint_managers.preservation_policy


class RunCheckpointer:
    """Saves and restores run checkpoints under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, save_interval_steps: int = 1):
        policy = _preservation.AnyPreservationPolicy(
            [
                _preservation.LatestN(n=keep),
                _preservation.BestN(
                    get_metric_fn=lambda metrics: metrics["miou"],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=policy,
            best_fn=lambda metrics: metrics["miou"],  # makes Orbax store per-step metrics
            create=True,
        )
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the highest mIoU, or None before any evaluation."""
        return self._manager.best_step()

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict | None = None,
        metrics: dict[str, float] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Starts an asynchronous save; `metrics` (with 'miou') ranks the best checkpoint."""
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            items[_DATA] = ocp.args.JsonSave(_json_safe(data_state))
        return self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=metrics, force=force
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict | None, int]:
        """Restores `step` (default: latest) onto the shardings of `abstract_state`."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}"
            )
        items = {_STATE: ocp.args.StandardRestore(abstract_state)}
        has_data = os.path.isdir(os.path.join(self.directory, str(step), _DATA))
        if has_data:
            items[_DATA] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        data_state = _from_json_safe(restored[_DATA]) if has_data else None
        logging.info("restored checkpoint %s/%d", self.directory, step)
        return restored[_STATE], data_state, step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_tree(directory: str, tree: Any) -> None:
    """Writes one pytree (e.g. converted pretrained parameters) as a standalone checkpoint."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), tree, force=True)
    checkpointer.wait_until_finished()


def restore_tree(directory: str, abstract_tree: Any | None = None) -> Any:
    """Reads a tree written by `save_tree`, onto `abstract_tree`'s shapes and shardings if given."""
    return ocp.StandardCheckpointer().restore(os.path.abspath(directory), abstract_tree)


def abstract_like(tree: Any) -> Any:
    """The shape/dtype/sharding skeleton of `tree`, the target of a restore."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _json_safe(data_state: dict) -> dict:
    # grain iterator states hold bytes on some versions; JSON needs text.
    return json.loads(json.dumps(data_state, default=lambda b: {"__bytes__": b.decode("latin-1")}))


def _from_json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__bytes__"}:
            return value["__bytes__"].encode("latin-1")
        return {key: _from_json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json_safe(item) for item in value]
    return value
