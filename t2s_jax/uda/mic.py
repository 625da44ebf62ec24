"""MIC, masked image consistency (docs/method.md §6; lhoyer/MIC `masking_consistency_module.py`).

One extra student pass on block-masked images, trained with cross-entropy against the
host's pseudo-labels of the clean target and their weights BEFORE ClassMix (no extra
teacher pass by default). `mic.mode` picks the images, as the original's `mask_mode`:

| mode | images | labels | weights | colour aug |
|---|---|---|---|---|
| separatetrgaug (default) | the B target images | pseudo-labels | pseudo-label weights | yes |
| separatetrg | the B target images | pseudo-labels | pseudo-label weights | no |
| separatesrcaug / separatesrc | the B source images | source labels | 1 | yes / no |
| separateaug / separate (B = 2) | source[0] and target[0] | y_s[0], pseudo-label[0] | 1, w[0] | yes / no |

The colour augmentation is the host's strong augmentation with MIC's own draws (one
jitter coin and one blur coin per batch, per-image jitter factors, one op order and one
blur sigma per batch: one kornia call over the batch), applied before masking so mask
edges stay sharp. The CE covers every pixel, masked or not, mean over all N*H*W.

`mic.mask_type` 'token' masks a ViT's patch tokens instead of pixel blocks (VFM-UDA): each
token independently with probability `mic.ratio`, replaced by the encoder's learned mask token
before the position embedding (`hosts.MaskedTokens`); the images themselves stay whole.

Teacher and weights: by default the host's pseudo-labels and weights. `mic.pseudo_weighting`
'threshold' re-weights them (q recomputed from the same teacher confidences with
`mic.pseudo_threshold`); 'none' = no confidence weight, only the ignored crop rows. A
`mic.teacher_alpha` makes a separate EMA teacher (the term's state in the train state,
updated at the start of the step like the host teacher; alpha 0 = the current student),
whose own forward on the clean target gives the pseudo-labels, as the original does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from t2s_jax.hosts import MaskedTokens
from t2s_jax.models import SegmentorOutput, resize_bilinear
from t2s_jax.models.vit import token_grid_hw
from t2s_jax.uda import augment, ema, masking, pseudo_labels
from t2s_jax.uda.term import Losses, Metrics, PseudoLabels, StepContext, Term

MODES = ("separatetrgaug", "separatetrg", "separatesrcaug", "separatesrc", "separateaug", "separate")
WEIGHTINGS = ("host", "threshold", "none")
MASK_TYPES = ("block", "token")
MASKED_PASS = "masked"


def default_options() -> ml_collections.ConfigDict:
    """The `mic` section of the run config (docs/method.md §6)."""
    mic = ml_collections.ConfigDict()
    # Images masked: 'separatetrgaug' (target, colour-augmented) | 'separatetrg' | 'separatesrcaug'
    # | 'separatesrc' | 'separateaug' | 'separate' (source[0] + target[0], needs batch_size 2).
    mic.mode = "separatetrgaug"
    # 'block': pixel blocks set to the mean colour (MIC) | 'token': ViT patch tokens replaced by
    # the mask token (VFM-UDA; needs config.model.encoder.type='vit')
    mic.mask_type = "block"
    mic.block_size = 32  # mask block side in pixels: 32 at 512^2 crops (DAFormer host), 64 at 1024^2 (HRDA)
    mic.ratio = 0.7  # share of blocks (tokens) masked: a block is kept iff U > ratio
    mic.weight = 1.0  # lambda_MIC
    # None = the host's EMA teacher; an EMA alpha (e.g. 0.0 = the current student, the "w/o EMA
    # teacher" ablation) = a separate EMA teacher, as the original builds one.
    mic.teacher_alpha = config_dict.placeholder(float)
    # Pixel weights of the masked CE: 'host' = the host's (quality q at uda.pseudo_threshold) |
    # 'threshold' = q at mic.pseudo_threshold | 'none' = no confidence weight, only the ignored rows.
    mic.pseudo_weighting = "host"
    mic.pseudo_threshold = config_dict.placeholder(float)  # read with pseudo_weighting='threshold' only
    return mic


# MIC draws its blur coin (> 0.5) whatever the host's blur setting is.
MIC_BLUR_PROB = 0.5


def mic_augment(key: jax.Array, images: jax.Array, uda_config: ml_collections.ConfigDict) -> jax.Array:
    """The host's colour augmentation with MIC's own draws: one kornia call over the batch, so
    one op order and one blur sigma for all images, per-image jitter factors."""
    options = augment.strong_augment_options(uda_config, images.shape[1:3], order_per="batch", sigma_per="batch")
    return augment.strong_augment(key, images, **{**options, "blur_prob": MIC_BLUR_PROB})


def rethresholded(pseudo: PseudoLabels, threshold: float | None, validity: jax.Array) -> jax.Array:
    """(B, H, W) pixel weights q' * V for another confidence threshold (None: V alone)."""
    if threshold is None:
        quality = jnp.ones((), jnp.float32)
    else:
        quality = jnp.mean((pseudo.confidence >= threshold).astype(jnp.float32))
    return quality * validity


class MaskedTargets(NamedTuple):
    label: jax.Array
    weight: jax.Array


class MicTerm(Term):
    """mic.weight * CE(student(masked images), pseudo-labels, weights)."""

    name = "mic"
    teacher_views = ("target",)
    student_passes = (MASKED_PASS,)
    random_streams = ("mask", "augment")

    def __init__(self, config: ml_collections.ConfigDict):
        mic = config.mic
        if mic.mode not in MODES:
            raise ValueError(f"config.mic.mode={mic.mode!r}; expected one of {MODES}")
        self.mic = mic
        self.uda = config.uda
        self.mask_type = mic.get("mask_type", "block")
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"config.mic.mask_type={self.mask_type!r}; expected one of {MASK_TYPES}")
        if self.mask_type == "token" and config.model.encoder.get("type") != "vit":
            raise ValueError(
                f"config.mic.mask_type='token' masks the patch tokens of a ViT encoder; config.model.encoder.type "
                f"is {config.model.encoder.get('type', 'mit')!r}: use mic.mask_type='block'"
            )
        self.encoder_config = config.model.encoder
        self.uses_target = "src" not in mic.mode
        self.needs_target = self.uses_target
        self.needs_pseudo_labels = self.uses_target
        self.teacher_views = ("target",) if self.uses_target else ()
        self.teacher_alpha = None if mic.teacher_alpha is None else float(mic.teacher_alpha)
        if mic.pseudo_weighting not in WEIGHTINGS:
            raise ValueError(f"config.mic.pseudo_weighting={mic.pseudo_weighting!r}; expected one of {WEIGHTINGS}")
        if (mic.pseudo_weighting == "threshold") != (mic.pseudo_threshold is not None):
            raise ValueError(
                f"config.mic.pseudo_threshold={mic.pseudo_threshold!r} with mic.pseudo_weighting="
                f"{mic.pseudo_weighting!r}: a threshold is set exactly with pseudo_weighting='threshold'"
            )
        self.threshold = {
            "host": float(config.uda.pseudo_threshold),
            "threshold": None if mic.pseudo_threshold is None else float(mic.pseudo_threshold),
            "none": None,
        }[mic.pseudo_weighting]
        self.rethreshold = mic.pseudo_weighting != "host"
        if mic.mode in ("separate", "separateaug") and config.data.batch_size != 2:
            raise ValueError(f"config.mic.mode={mic.mode!r} needs config.data.batch_size=2 (source[0] + target[0])")

    def init_state(self, params: Any) -> Any:
        """The separate EMA teacher's parameters (a copy of the student), if configured."""
        return None if self.teacher_alpha is None else jax.tree.map(jnp.copy, params)

    def update_state(self, state: Any, params: Any, step: jax.Array) -> Any:
        return ema.update_teacher(state, params, step, self.teacher_alpha)

    def _target_pseudo_labels(self, context: StepContext) -> PseudoLabels:
        if self.teacher_alpha is None:
            return context.pseudo
        teacher = context.teacher_forward(context.state, context.target_image)
        labels, weight, confidence, quality = pseudo_labels.pseudo_labels(
            resize_bilinear(teacher.logits, context.target_image.shape[1:3]),
            threshold=self.threshold if self.threshold is not None else 0.0,
            ignore_top=self.uda.pseudo_ignore_top,
            ignore_bottom=self.uda.pseudo_ignore_bottom,
            valid=context.target_valid,
        )
        return PseudoLabels(labels, weight, confidence, quality)

    def _target_weight(self, pseudo: PseudoLabels, valid: jax.Array | None) -> jax.Array:
        if self.teacher_alpha is None and not self.rethreshold:
            return pseudo.weight
        validity = pseudo_labels.pixel_validity(
            pseudo.confidence.shape, self.uda.pseudo_ignore_top, self.uda.pseudo_ignore_bottom, valid
        )
        return rethresholded(pseudo, self.threshold, validity)

    def _images_and_targets(self, context: StepContext) -> tuple[jax.Array, MaskedTargets]:
        mode = self.mic.mode
        source_image, source_label = context.source_image, context.source_label
        if "src" in mode:
            return source_image, MaskedTargets(source_label, jnp.ones(source_label.shape, jnp.float32))
        pseudo = self._target_pseudo_labels(context)
        weight = self._target_weight(pseudo, context.target_valid)
        if "trg" in mode:
            return context.target_image, MaskedTargets(pseudo.label, weight)
        images = jnp.stack([source_image[0], context.target_image[0]])
        labels = jnp.stack([source_label[0], pseudo.label[0]])
        weights = jnp.stack([jnp.ones_like(weight[0]), weight[0]])
        return images, MaskedTargets(labels, weights)

    def prepare(self, context: StepContext) -> tuple[dict, MaskedTargets]:
        images, targets = self._images_and_targets(context)
        if self.mic.mode.endswith("aug"):
            images = mic_augment(context.keys["augment"], images, self.uda)
        if self.mask_type == "token":
            grid_h, grid_w = token_grid_hw(self.encoder_config, images.shape[1:3])
            token_mask = jax.random.uniform(context.keys["mask"], (images.shape[0], grid_h * grid_w)) < self.mic.ratio
            return {MASKED_PASS: MaskedTokens(images, token_mask)}, targets
        keep = masking.block_masks(
            context.keys["mask"], images.shape[0], images.shape[1:3], int(self.mic.block_size), float(self.mic.ratio)
        )
        return {MASKED_PASS: masking.apply_mask(images, keep)}, targets

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: MaskedTargets
    ) -> tuple[Losses, Metrics]:
        loss = context.host.segmentation_loss(student[MASKED_PASS], prepared.label, prepared.weight)
        return {"loss_mic": self.mic.weight * loss}, {}
