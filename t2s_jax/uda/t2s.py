"""The T2S-DA term (method.md 5): pull student features of pseudo-target images towards the
teacher's source class prototypes, away from other classes' source and unreliable target
features. The image translation lives in `translation.py`, the loss in `pulling/`.

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


def default_options() -> ml_collections.ConfigDict:
    """The `pull` section of the run config (method.md 5)."""
    pull = ml_collections.ConfigDict()
    pull.weight = 0.1  # lambda
    pull.loss = "infonce"  # 'infonce' | 'mse'
    pull.temperature = 0.2  # tau (InfoNCE)
    pull.translation = "fda"  # pseudo-target engine: 'fda' | 'color_jitter' | 'gaussian_blur'
    pull.fda_beta = 0.01
    pull.query_domain = "pseudo_target"  # 'pseudo_target' | 'source' | 'target'
    pull.key_domain = "source"  # 'source' | 'target' (positive prototypes)
    pull.num_queries = 128  # N, base number of queries
    pull.class_balanced_queries = True  # CBQS; False = class-equalised (N per class)
    pull.num_negatives = 1024  # M negatives per query
    pull.domain_equalised_negatives = True  # DENPS: M/2 from each domain
    pull.unreliable_fraction = 0.5  # alpha: target pixels below this confidence percentile are negatives
    pull.dynamic_reweighting = True  # DRW
    pull.reweight_scale = 0.5  # s in w_c = (1 - conf_c)^s
    pull.num_groups = 0  # sampling groups along the batch (uda/pulling/); 0 = one per device
    return pull
PSEUDO_TARGET_PASS = "pseudo_target"
TARGET_PASS = "target"


class PullTerm(Term):
    """pull.weight * L_pull; with no target data (domain generalisation) source keys only."""

    name = "pull"
    teacher_projection = True
    student_projection = True
    random_streams = ("translation", "pulling")

    def __init__(self, config: ml_collections.ConfigDict):
        pull = config.pull
        if pull.query_domain not in QUERY_DOMAINS:
            raise ValueError(f"config.pull.query_domain={pull.query_domain!r}; expected one of {QUERY_DOMAINS}")
        self.pull = pull
        self.uda = config.uda
        self.has_target = bool(config.data.target)
        self.options = pulling.PullOptions.from_config(config)  # checked once, here
        if not self.has_target:
            for name, value, needs in (
                ("pull.query_domain", pull.query_domain, "target"),
                ("pull.translation", pull.translation, "fda"),
            ):
                if value == needs:
                    raise ValueError(f"config.{name}={value!r} needs target data (config.data.target is empty)")
        self.teacher_views = ("target", "source") if self.has_target else ("source",)
        # Source queries are the source term's pass, read, not produced a second time.
        self.query_pass = {"pseudo_target": PSEUDO_TARGET_PASS, "target": TARGET_PASS, "source": SOURCE_PASS}[
            pull.query_domain
        ]
        if self.query_pass == SOURCE_PASS:
            self.reads_passes = (SOURCE_PASS,)
        else:
            self.student_passes = (self.query_pass,)

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
        if self.query_pass == PSEUDO_TARGET_PASS:
            return {PSEUDO_TARGET_PASS: self._pseudo_target(context)}, None
        if self.query_pass == TARGET_PASS:
            return {TARGET_PASS: context.target_image}, None
        return {}, None

    def losses(
        self, context: StepContext, student: Mapping[str, SegmentorOutput], prepared: Any
    ) -> tuple[Losses, Metrics]:
        queries = student[self.query_pass].projection
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
            self.options,
            context.keys["pulling"],
            query_features=queries,
            query_labels=query_labels,
            source_key_features=context.teacher["source"].projection,
            source_labels=source_labels,
            target_key_features=target_keys,
            target_pseudo_labels=target_labels,
            target_confidence=target_confidence,
            mesh=context.mesh,
        )
        metrics = {f"pull_{name}": item for name, item in metrics.items()}
        metrics["pull_unweighted"] = value
        return {"loss_pull": self.pull.weight * value}, metrics
