"""DACS self-training (method.md 4.5-4.7): ClassMix of source onto target, strong
augmentation, and the pseudo-label-weighted cross-entropy of the student on the mix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from t2s_jax.models import SegmentorOutput
from t2s_jax.uda import augment, classmix
from t2s_jax.uda.term import Losses, Metrics, StepContext, Term

MIXED_PASS = "mixed"


class MixedTargets(NamedTuple):
    label: jax.Array  # (B, H, W) source label inside the ClassMix mask, pseudo-label outside
    weight: jax.Array  # (B, H, W) 1 inside the mask, the pseudo-label weight outside


class DacsTerm(Term):
    """L_mix: weighted CE on the strongly augmented ClassMix image."""

    name = "dacs"
    needs_target = True
    needs_pseudo_labels = True
    teacher_views = ("target",)
    student_passes = (MIXED_PASS,)
    random_streams = ("classmix", "augment")

    def __init__(self, config: ml_collections.ConfigDict):
        self.uda = config.uda
        self.num_classes = int(config.model.num_classes)

    def prepare(self, context: StepContext) -> tuple[dict, MixedTargets]:
        pseudo = context.pseudo
        source_label = context.source_label
        mask = classmix.classmix_masks(context.keys["classmix"], source_label, self.num_classes)
        mixed = classmix.mix(mask, context.source_image, context.target_image)
        mixed = augment.strong_augment(
            context.keys["augment"], mixed, **augment.strong_augment_options(self.uda, mixed.shape[1:3])
        )
        targets = MixedTargets(
            label=jnp.where(mask > 0, source_label, pseudo.label),
            weight=classmix.mix(mask, jnp.ones_like(pseudo.weight), pseudo.weight),
        )
        return {MIXED_PASS: mixed}, targets

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: MixedTargets
    ) -> tuple[Losses, Metrics]:
        loss = context.host.segmentation_loss(student[MIXED_PASS], prepared.label, prepared.weight)
        return {"loss_mixed": loss}, {}
