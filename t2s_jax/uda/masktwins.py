"""MaskTwins, dual-form complementary masking (docs/method.md §7; jwwang0421/masktwins).

Replaces MIC's single masked pass by V >= 2 passes on complementary masked views of the
SAME colour-augmented target image (MIC's augmentation, drawn once): view 1 keeps mask M,
view 2 its exact complement 1 - M (`masktwins.complementary=False`: an independent mask of
ratio 1 - r instead, the "two random masks" ablation; V > 2: the K-view partition). Each
view is trained with CE against the host's pseudo-labels and unmixed weights, averaged over
views (0.5 each for two), times `masktwins.weight` (lambda_MIC); plus
`masktwins.consistency_weight` (0.01) x the mean squared difference of the views' raw
stride-4 logits (mean over pairs for V > 2), with gradients through every view.

The released code cuts the target batch to its first image (docs/method.md §7):
`masktwins.single_target_image=True` reproduces that for the whole step (the term's batch
transform: the teacher, ClassMix and the views all see B copies of target image 0); the
one image is colour-augmented once and masked once, then broadcast, so the B identical
copies stand for the original's batch of one.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from t2s_jax.models import SegmentorOutput
from t2s_jax.uda import masking
from t2s_jax.uda.mic import mic_augment
from t2s_jax.uda.term import Batch, Losses, Metrics, StepContext, Term

TARGET_KEYS = ("target_image", "target_label", "target_valid")


def default_options() -> ml_collections.ConfigDict:
    """The `masktwins` section of the run config (docs/method.md §7)."""
    twins = ml_collections.ConfigDict()
    twins.block_size = 32  # 64 at 1024^2 crops (the released HRDA config); 32 at 512^2
    twins.ratio = 0.5
    twins.num_views = 2  # 2 = the mask and its complement; K > 2: the K-view partition
    twins.complementary = True  # False: independent masks (the "random two masks" ablation)
    twins.augment = True  # colour-augment the target before masking (MIC's 'separatetrgaug')
    twins.weight = 1.0  # lambda_MIC on the views' mean cross-entropy
    twins.consistency_weight = 0.01  # MSE between the views' raw logits, gradients through both
    # Train the whole step on the first target image of each batch, repeated (the released
    # code's cut; the MaskTwins configs set it): pseudo-labels, ClassMix and the views use it.
    # False: every target image, for comparisons at equal batch size.
    twins.single_target_image = False
    return twins


def view_pass(index: int) -> str:
    return f"twin_{index}"


def consistency(logits: list[jax.Array]) -> jax.Array:
    """Mean over view pairs of the mean squared difference of raw float32 logits."""
    pairs = list(itertools.combinations(logits, 2))
    squared = [jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))) for a, b in pairs]
    return sum(squared) / len(pairs)


class MaskTwinsTerm(Term):
    """masktwins.weight * mean_v CE(view v) + masktwins.consistency_weight * MSE between views."""

    name = "masktwins"
    needs_target = True
    needs_pseudo_labels = True
    teacher_views = ("target",)
    random_streams = ("mask", "augment")

    def __init__(self, config: ml_collections.ConfigDict):
        self.twins = config.masktwins
        self.uda = config.uda
        self.num_views = int(config.masktwins.num_views)
        if self.num_views < 2:
            raise ValueError(f"config.masktwins.num_views={self.num_views}; expected 2 or more")
        if "single_target_image" in config.uda:
            raise ValueError("config.uda.single_target_image moved to config.masktwins.single_target_image")
        self.single_target_image = bool(config.masktwins.single_target_image)
        self.student_passes = tuple(view_pass(v) for v in range(self.num_views))

    def transform_batch(self, batch: Batch) -> Batch:
        if not self.single_target_image:
            return batch
        first = {name: jnp.broadcast_to(batch[name][:1], batch[name].shape) for name in TARGET_KEYS if name in batch}
        return {**batch, **first}

    def prepare(self, context: StepContext) -> tuple[dict, Any]:
        images = context.target_image
        batch_size = images.shape[0]
        if self.single_target_image:  # one image, augmented and masked once (the copies are equal)
            images = images[:1]
        if self.twins.augment:
            images = mic_augment(context.keys["augment"], images, self.uda)
        masks = masking.view_masks(
            context.keys["mask"], images.shape[0], images.shape[1:3], int(self.twins.block_size),
            float(self.twins.ratio), num_views=self.num_views, complementary=bool(self.twins.complementary),
        )  # fmt: skip
        views = [masking.apply_mask(images, masks[v]) for v in range(self.num_views)]
        return {view_pass(v): jnp.broadcast_to(x, (batch_size, *x.shape[1:])) for v, x in enumerate(views)}, None

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: Any
    ) -> tuple[Losses, Metrics]:
        pseudo = context.pseudo
        logits = [student[view_pass(v)].logits for v in range(self.num_views)]
        view_losses = [
            context.host.segmentation_loss(student[view_pass(v)], pseudo.label, pseudo.weight)
            for v in range(self.num_views)
        ]
        mean_squared = consistency(logits)
        return (
            {
                "loss_twins": self.twins.weight * sum(view_losses) / self.num_views,
                "loss_twins_consistency": self.twins.consistency_weight * mean_squared,
            },
            {"twins_mse": mean_squared},
        )
