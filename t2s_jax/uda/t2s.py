"""The T2S-DA term (method.md 5): pull student features of pseudo-target images towards the
teacher's source class prototypes, away from other classes' source and unreliable target
features. The image translation lives in `translation.py`, the loss in `pulling.py`.

Passes: the queries come from a student pass chosen by `pull.query_domain` ('pseudo_target':
the translated source image, labelled by the source labels; 'target': the target image,
labelled by the teacher; 'source': the source pass of the source term). The keys come from
the teacher's source and target views, with the projector.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from t2s_jax import parallel
from t2s_jax.models import SegmentorOutput
from t2s_jax.uda import augment, pulling
from t2s_jax.uda.source import SOURCE_PASS
from t2s_jax.uda.term import Losses, Metrics, StepContext, Term
from t2s_jax.uda.translation import pseudo_target_images

QUERY_DOMAINS = ("pseudo_target", "source", "target")
PSEUDO_TARGET_PASS = "pseudo_target"
TARGET_PASS = "target"


class PullTerm(Term):
    """pull.weight * L_pull; with no target data (domain generalisation) source keys only."""

    name = "pull"
    teacher_projection = True
    student_projection = True

    def __init__(self, config: ml_collections.ConfigDict):
        pull = config.pull
        if pull.query_domain not in QUERY_DOMAINS:
            raise ValueError(f"config.pull.query_domain={pull.query_domain!r}; expected one of {QUERY_DOMAINS}")
        self.pull = pull
        self.uda = config.uda
        self.has_target = bool(config.data.target)
        self.options = pulling.pulling_loss_options(config)
        pulling.check_options(
            self.options["loss"], self.options["key_domain"], self.has_target,
            self.options["domain_equalised_negatives"], self.options["dynamic_reweighting"],
        )  # fmt: skip
        if not self.has_target:
            for name, value, needs in (
                ("pull.query_domain", pull.query_domain, "target"),
                ("pull.translation", pull.translation, "fda"),
            ):
                if value == needs:
                    raise ValueError(f"config.{name}={value!r} needs target data (config.data.target is empty)")
        self.teacher_views = ("target", "source") if self.has_target else ("source",)

    def _pseudo_target(self, context: StepContext) -> jax.Array:
        translate = functools.partial(
            pseudo_target_images,
            engine=self.pull.translation,
            fda_beta=self.pull.fda_beta,
            **augment.strong_augment_options(self.uda, context.source_image.shape[1:3]),
        )
        if self.pull.translation == "fda" and context.mesh is not None:
            # FDA is deterministic and per example: each device transforms its own images.
            fda_per_device = parallel.per_device(lambda s, t: translate(None, s, t), context.mesh)
            return fda_per_device(context.source_image, context.target_image)
        return translate(context.keys["translation"], context.source_image, context.target_image)

    def prepare(self, context: StepContext) -> tuple[dict, Any]:
        domain = self.pull.query_domain
        if domain == "pseudo_target":
            return {PSEUDO_TARGET_PASS: self._pseudo_target(context)}, None
        if domain == "target":
            return {TARGET_PASS: context.target_image}, None
        return {SOURCE_PASS: context.source_image}, None

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: Any
    ) -> tuple[Losses, Metrics]:
        query_pass = {"pseudo_target": PSEUDO_TARGET_PASS, "target": TARGET_PASS}.get(
            self.pull.query_domain, SOURCE_PASS
        )
        queries = student[query_pass].projection
        feature_hw = queries.shape[1:3]
        source_labels = pulling.downsample_labels_nearest(context.source_label, feature_hw)
        target_keys = target_labels = target_confidence = None
        if self.has_target:
            target = context.teacher["target"]
            target_keys = target.projection
            probabilities = jax.nn.softmax(target.logits.astype(jnp.float32), axis=-1)
            target_labels = pulling.downsample_labels_nearest(jnp.argmax(probabilities, -1), feature_hw)
            target_confidence = pulling.downsample_labels_nearest(jnp.max(probabilities, -1), feature_hw)
        query_labels = target_labels if self.pull.query_domain == "target" else source_labels
        value, metrics = pulling.pulling_loss(
            context.keys["pulling"],
            query_features=queries,
            query_labels=query_labels,
            source_key_features=context.teacher["source"].projection,
            source_labels=source_labels,
            target_key_features=target_keys,
            target_pseudo_labels=target_labels,
            target_confidence=target_confidence,
            mesh=context.mesh,
            **self.options,
        )
        metrics = {f"pull_{name}": item for name, item in metrics.items()}
        metrics["pull_unweighted"] = value
        return {"loss_pull": self.pull.weight * value}, metrics
