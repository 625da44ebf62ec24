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
`uda.single_target_image=True` reproduces that for the whole step; the views then share
one mask draw, so the B identical copies stand for the original's batch of one.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from t2s_jax import losses
from t2s_jax.models import SegmentorOutput
from t2s_jax.uda import masking
from t2s_jax.uda.mic import mic_augment
from t2s_jax.uda.term import Losses, Metrics, StepContext, Term


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

    def __init__(self, config: ml_collections.ConfigDict):
        self.twins = config.masktwins
        self.uda = config.uda
        self.num_views = int(config.masktwins.num_views)
        self.shared_mask = bool(config.uda.single_target_image)

    def prepare(self, context: StepContext) -> tuple[dict, Any]:
        images = context.target_image
        if self.twins.augment:
            images = mic_augment(context.keys["mask_augment"], images, self.uda)
        num_masks = 1 if self.shared_mask else images.shape[0]
        masks = masking.view_masks(
            context.keys["mask"], num_masks, images.shape[1:3], int(self.twins.block_size),
            float(self.twins.ratio), num_views=self.num_views, complementary=bool(self.twins.complementary),
        )  # fmt: skip
        masks = jnp.broadcast_to(masks, (self.num_views, *images.shape[:3]))
        return {view_pass(v): masking.apply_mask(images, masks[v]) for v in range(self.num_views)}, None

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: Any
    ) -> tuple[Losses, Metrics]:
        pseudo = context.pseudo
        logits = [student[view_pass(v)].logits for v in range(self.num_views)]
        view_losses = [losses.segmentation_loss(x, pseudo.label, pseudo.weight) for x in logits]
        mean_squared = consistency(logits)
        return (
            {
                "loss_twins": self.twins.weight * sum(view_losses) / self.num_views,
                "loss_twins_consistency": self.twins.consistency_weight * mean_squared,
            },
            {"twins_mse": mean_squared},
        )
