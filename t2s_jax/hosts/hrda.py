"""The HRDA host (docs/hosts.md): multi-resolution training and inference around a single-scale
segmentor with a scale-attention head (`config.model.hrda`).

Student pass: the encoder and head run on the whole crop resized by `context_scale` (the
context) and on a full-resolution detail crop of `detail_crop_hw` at a random box drawn per
pass (offsets multiples of `crop_divisible`); the class-wise attention of the context fuses
the two inside the box (`models.hrda.fuse_in_box`). Its loss is
(1 - detail - context weight) CE(fused) + detail weight CE(detail logits, labels in the box)
+ context weight CE(context logits). Teacher and evaluation: the context pass plus an
overlapping slide of detail windows over the full-resolution crop, fused without a box.

All passes (or views) of a step run as one context forward and one detail forward, each pass
with its own BatchNorm statistics in each: HRDA's head is called separately on context and
detail. What the terms read besides the logits (encoder features for the feature distance,
the projector output for the pulling loss) comes from the context pass: T2S-DA on HRDA's
low-resolution branch, as the paper implements it.
"""

from __future__ import annotations

import zlib

import flax.struct
import jax
import ml_collections

from t2s_jax import losses
from t2s_jax.hosts.base import Host, SingleScaleHost, unstack_outputs
from t2s_jax.models import Segmentor, SegmentorOutput, hrda, stack_passes
from t2s_jax.uda import normalize


@flax.struct.dataclass
class HRDAOutput(SegmentorOutput):
    """`logits`: the fused logits on the crop's stride-4 grid; the features and projection are
    the context pass's. Training passes also carry their detail branch."""

    context_logits: jax.Array | None = None  # (1 - masked attention) * context logits (LR grid)
    detail_logits: jax.Array | None = None  # (B, detail_h/4, detail_w/4, K)
    detail_box: jax.Array | None = None  # (2,) int32 (y, x) of the detail crop in the crop


class HRDAHost(Host):
    """HRDA around a single-scale host's segmentor (built with `model.hrda.enabled`: it then
    carries the scale-attention head)."""

    def __init__(self, config: ml_collections.ConfigDict, single_scale: SingleScaleHost):
        self.single_scale = single_scale
        options = config.model.hrda
        self.context_scale = float(options.context_scale)
        self.detail_hw = tuple(options.detail_crop_hw)
        self.divisible = int(options.crop_divisible)
        self.slide_stride_hw = tuple(options.detail_slide_stride_hw)
        self.detail_weight = float(options.detail_loss_weight)
        self.context_weight = float(options.context_loss_weight)
        self.output_stride = single_scale.output_stride
        self._check(config)

    def _check(self, config: ml_collections.ConfigDict) -> None:
        """One-line ValueErrors naming the model.hrda key whose value cannot work with the crop."""
        if self.detail_weight + self.context_weight > 1:
            raise ValueError(
                f"config.model.hrda.detail_loss_weight + context_loss_weight = "
                f"{self.detail_weight + self.context_weight:g}: at most 1 (the fused loss gets the rest)"
            )
        crop_hw = tuple(config.data.crop_hw)
        cell = self.output_stride / self.context_scale  # full-resolution pixels per context logit
        if any(d > c for d, c in zip(self.detail_hw, crop_hw)):
            raise ValueError(f"config.model.hrda.detail_crop_hw={self.detail_hw} must fit in data.crop_hw={crop_hw}")
        for key, hw in (("data.crop_hw", crop_hw), ("model.hrda.detail_crop_hw", self.detail_hw)):
            if any(side % cell for side in hw):
                raise ValueError(
                    f"config.{key}={hw}: each side must be a multiple of {cell:g} (output stride "
                    f"{self.output_stride} / model.hrda.context_scale {self.context_scale:g})"
                )
        if self.divisible % self.output_stride:
            raise ValueError(
                f"config.model.hrda.crop_divisible={self.divisible} must be a multiple of the output "
                f"stride {self.output_stride} (the detail logits are pasted on the stride grid)"
            )

    def build_model(self, model_config, *, rngs):
        return self.single_scale.build_model(model_config, rngs=rngs)

    # ------------------------------------------------------------------ student

    def student_forward(self, model, passes, *, dropout_key, crop_key, with_projection):
        names = list(passes)
        context_key, detail_key = jax.random.split(dropout_key)
        context = model.forward(
            hrda.context_resize(normalize.normalize(stack_passes([passes[n] for n in names])), self.context_scale),
            train=True, num_batch_groups=len(names), dropout_key=context_key,
            with_projection=with_projection, with_attention=True,
        )  # fmt: skip
        crop_hw = passes[names[0]].shape[1:3]
        boxes = {
            name: hrda.draw_detail_box(
                jax.random.fold_in(crop_key, zlib.crc32(name.encode()) & 0x7FFFFFFF),
                crop_hw, self.detail_hw, self.divisible,
            )  # fmt: skip
            for name in names
        }
        details = stack_passes([hrda.crop_box(passes[n], boxes[n], self.detail_hw) for n in names])
        detail = model.forward(
            normalize.normalize(details), train=True, num_batch_groups=len(names), dropout_key=detail_key
        )
        contexts = unstack_outputs(context, names)
        detail_logits = {name: output.logits for name, output in unstack_outputs(detail, names).items()}
        return {name: self._fused(contexts[name], detail_logits[name], boxes[name]) for name in names}

    def _fused(self, context: SegmentorOutput, detail_logits: jax.Array, box: jax.Array) -> HRDAOutput:
        fused, weighted_context = hrda.fuse_in_box(
            context.logits, context.attention, detail_logits, box,
            output_stride=self.output_stride, context_scale=self.context_scale, with_weighted_context=True,
        )  # fmt: skip
        return HRDAOutput(
            logits=fused,
            encoder_features=context.encoder_features,
            decoder_features=context.decoder_features,
            projection=context.projection,
            distillation=context.distillation,
            context_logits=weighted_context,
            detail_logits=detail_logits,
            detail_box=box,
        )

    def segmentation_loss(self, output, labels, weights=None):
        fused_weight = 1.0 - self.detail_weight - self.context_weight
        loss = fused_weight * losses.segmentation_loss(output.logits, labels, weights)
        if self.detail_weight:
            crop = lambda x: None if x is None else hrda.crop_box(x, output.detail_box, self.detail_hw)  # noqa: E731
            loss += self.detail_weight * losses.segmentation_loss(output.detail_logits, crop(labels), crop(weights))
        if self.context_weight:
            loss += self.context_weight * losses.segmentation_loss(output.context_logits, labels, weights)
        return loss

    # ------------------------------------------------------------------ teacher and evaluation

    def _inference(
        self, model: Segmentor, images: jax.Array, *, use_batch_stats: bool, num_views: int, with_projection: bool
    ) -> tuple[SegmentorOutput, jax.Array]:
        """(context output, fused logits) of normalised images: context pass + detail slide."""
        bn = dict(train=False, use_batch_stats=use_batch_stats, num_batch_groups=num_views)
        context = model.forward(
            hrda.context_resize(images, self.context_scale), with_projection=with_projection, with_attention=True, **bn
        )
        canvas = hrda.detail_slide(
            lambda windows: model.forward(windows, **bn).logits, images,
            window_hw=self.detail_hw, stride_hw=self.slide_stride_hw, output_stride=self.output_stride,
        )  # fmt: skip
        return context, hrda.fuse_full(context.logits, context.attention, canvas, context_scale=self.context_scale)

    def teacher_forward(self, model, views, *, with_projection):
        names = list(views)
        images = normalize.normalize(stack_passes([views[n] for n in names]))
        context, fused = self._inference(
            model, images, use_batch_stats=True, num_views=len(names), with_projection=with_projection
        )
        output = HRDAOutput(
            logits=fused,
            encoder_features=context.encoder_features,
            decoder_features=context.decoder_features,
            projection=context.projection,
        )
        return unstack_outputs(output, names)

    def imagenet_features(self, imagenet_model, images):
        # Eval mode: an encoder with BatchNorm (ResNet) normalises with the checkpoint's statistics.
        images = hrda.context_resize(normalize.normalize(images), self.context_scale)
        return imagenet_model.encoder(images, use_batch_stats=False)[-1]

    def eval_logits(self, model, images):
        return self._inference(model, images, use_batch_stats=False, num_views=1, with_projection=False)[1]
