"""The host interface, and the single-scale host (DAFormer: one forward of the segmentor per image).

A host is what the train step, the loss terms and evaluation call instead of the model: it
runs the student over the step's named passes, the teacher over its views, computes a pass's
segmentation loss, the features of the feature distance, and the logits of evaluation. A
host holds no state; the model (an `nnx` module merged from the train state) is an argument.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from t2s_jax import losses
from t2s_jax.models import Segmentor, SegmentorOutput, build_segmentor, stack_passes, unstack_passes
from t2s_jax.uda import normalize


class MaskedTokens(NamedTuple):
    """A student pass whose ViT patch tokens are partly replaced by the learned mask token
    (VFM-UDA's masked pass): a term gives this instead of a plain image batch."""

    images: jax.Array  # (B, H, W, 3) float32 0..255
    token_mask: jax.Array  # (B, num_tokens) bool, True = masked; row-major over the token grid


def unstack_outputs(output: SegmentorOutput, names: list[str]) -> dict[str, SegmentorOutput]:
    """{name: its pass's share} of an output whose batch stacks `names` (`stack_passes`)."""
    return {
        name: jax.tree.map(lambda x, i=index: unstack_passes(x, len(names))[i], output)
        for index, name in enumerate(names)
    }


class Host(abc.ABC):
    """The interface. Images are float32 RGB 0..255 NHWC; every method is traced inside the step.

    Passes (student) and views (teacher) are batches of equal shape; each is normalised with
    its own BatchNorm statistics.
    """

    def build_model(self, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> Segmentor:
        """The segmentor (random init); its initial parameters are also the feature distance's
        frozen ImageNet model."""
        return build_segmentor(model_config, rngs=rngs)

    @abc.abstractmethod
    def student_forward(
        self,
        model: Segmentor,
        passes: Mapping[str, jax.Array],
        *,
        dropout_key: jax.Array,
        crop_key: jax.Array,
        with_projection: bool,
    ) -> dict[str, SegmentorOutput]:
        """Training-mode outputs per pass (dropout on, batch statistics, running statistics
        updated in `model`); `crop_key` draws whatever random crops the host takes."""

    @abc.abstractmethod
    def teacher_forward(
        self, model: Segmentor, views: Mapping[str, jax.Array], *, with_projection: bool
    ) -> dict[str, SegmentorOutput]:
        """Mean-teacher outputs per view: dropout off, BatchNorm on the views' own statistics.
        Their `logits` are what pseudo-labels are taken from."""

    @abc.abstractmethod
    def segmentation_loss(
        self, output: SegmentorOutput, labels: jax.Array, weights: jax.Array | None = None
    ) -> jax.Array:
        """The supervised loss of one student pass against (B, H, W) labels and pixel weights."""

    @abc.abstractmethod
    def imagenet_features(self, imagenet_model: Segmentor, images: jax.Array) -> jax.Array:
        """The frozen ImageNet encoder's last-stage features of `images`, on the grid of the
        student's `encoder_features[-1]` (the feature distance compares the two)."""

    @abc.abstractmethod
    def eval_logits(self, model: Segmentor, images: jax.Array) -> jax.Array:
        """Stride-4 logits of normalised images (one evaluation window), model in eval mode."""


class SingleScaleHost(Host):
    """One segmentor forward per image (DAFormer and every single-scale host): all passes of a
    step stacked into one batch (`stack_passes`), one BatchNorm group each."""

    def __init__(self, output_stride: int = 4):
        self.output_stride = output_stride  # input pixels per logit (`Segmentor.output_stride`)

    def _forward(
        self, model: Segmentor, passes: Mapping[str, jax.Array | MaskedTokens], **kwargs
    ) -> dict[str, SegmentorOutput]:
        names = list(passes)
        masked = {name: passes[name] for name in names if isinstance(passes[name], MaskedTokens)}
        images = [masked[name].images if name in masked else passes[name] for name in names]
        if masked:
            # One mask over the stacked batch: the other passes keep every token.
            keep_all = jnp.zeros_like(next(iter(masked.values())).token_mask)
            token_masks = [masked[name].token_mask if name in masked else keep_all for name in names]
            kwargs["token_mask"] = stack_passes(token_masks)
        stacked = normalize.normalize(stack_passes(images))
        return unstack_outputs(model.forward(stacked, num_batch_groups=len(names), **kwargs), names)

    def student_forward(self, model, passes, *, dropout_key, crop_key, with_projection):
        del crop_key
        return self._forward(model, passes, train=True, dropout_key=dropout_key, with_projection=with_projection)

    def teacher_forward(self, model, views, *, with_projection):
        return self._forward(model, views, train=False, use_batch_stats=True, with_projection=with_projection)

    def segmentation_loss(self, output, labels, weights=None):
        return losses.segmentation_loss(output.logits, labels, weights)

    def imagenet_features(self, imagenet_model, images):
        # Eval mode: an encoder with BatchNorm (ResNet) normalises with the checkpoint's statistics.
        return imagenet_model.encoder(normalize.normalize(images), use_batch_stats=False)[-1]

    def eval_logits(self, model, images):
        return model(images, train=False)
