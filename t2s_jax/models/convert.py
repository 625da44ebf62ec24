r"""Convert a pretrained checkpoint once into an Orbax checkpoint of the model's variables.

  # A Hugging Face SegFormer directory: the model its config.json describes.
  python -m t2s_jax.models.convert --checkpoint=/data/segformer-b5 --output=/data/segformer-b5-orbax
  # MiT ImageNet weights under the segmentor a config describes (DAFormer head random-initialised).
  python -m t2s_jax.models.convert --checkpoint=/data/mit_b5.pth --output=/data/daformer-b5-init \
      --config=configs/gta_cs_daformer.py

The output directory holds `state/` (`t2s_jax.checkpointing.save_tree`: {'params', 'batch_stats'}
as plain nested dicts) and `model_config.json` (the `config.model` the tree belongs to).
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_collections
from flax import nnx

from t2s_jax import checkpointing
from t2s_jax.models import weights
from t2s_jax.models.segmentor import build_segmentor


def convert_checkpoint(
    checkpoint: str | Path, output: str | Path, model_config: ml_collections.ConfigDict | None = None
) -> weights.LoadSummary:
    """Load `checkpoint` (into the segmentor `model_config` describes, if given) and save it with Orbax."""
    output = Path(output).absolute()
    if model_config is None:
        model, model_config, summary = weights.load_hf_pretrained(checkpoint)
    else:
        if problem := weights.problem(checkpoint):  # before the segmentor is built
            raise weights.WeightsError(problem)
        model_config = ml_collections.ConfigDict(model_config)
        model_config.pretrained = str(checkpoint)
        model = nnx.jit(lambda: build_segmentor(model_config, rngs=nnx.Rngs(0)))()
        summary = weights.load_pretrained_encoder(model, checkpoint)
    tree = {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    }
    output.mkdir(parents=True, exist_ok=True)
    checkpointing.save_tree(str(output / "state"), tree)
    (output / "model_config.json").write_text(model_config.to_json(indent=2))
    return summary


def main(argv: list[str]) -> None:
    del argv
    model_config = FLAGS.config.model if FLAGS.config is not None else None
    try:
        summary = convert_checkpoint(FLAGS.checkpoint, FLAGS.output, model_config)
    except weights.WeightsError as error:  # unreadable, or not fitting the model: nothing written
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(summary)
    print(f"wrote {Path(FLAGS.output).absolute() / 'state'}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    flags.DEFINE_string("checkpoint", None, "MiT .pth / .safetensors / Hugging Face SegFormer directory", required=True)
    flags.DEFINE_string("output", None, "directory for the Orbax checkpoint", required=True)
    config_flags.DEFINE_config_file("config", None, "config file: load the checkpoint as its encoder weights")
    app.run(main)
