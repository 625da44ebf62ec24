"""Methods as presets of loss terms.

`config.method` names a preset, a list of terms (modules in `t2s_jax/uda/`); a config may
set `config.terms` directly instead. Adding a method = a new term module and a preset here:
the step (`steps.py`) knows no method names.
"""

from __future__ import annotations

import copy

import ml_collections

from t2s_jax.uda.dacs import DacsTerm
from t2s_jax.uda.distillation import DistillationTerm
from t2s_jax.uda.feature_distance import FeatureDistanceTerm
from t2s_jax.uda.masktwins import MaskTwinsTerm
from t2s_jax.uda.mic import MicTerm
from t2s_jax.uda.source import SourceTerm
from t2s_jax.uda.t2s import PullTerm
from t2s_jax.uda.term import Term

TERMS: dict[str, type[Term]] = {
    term.name: term
    for term in (SourceTerm, FeatureDistanceTerm, DacsTerm, PullTerm, MicTerm, MaskTwinsTerm, DistillationTerm)
}

_DAFORMER = ("source", "feature_distance", "dacs")
PRESETS: dict[str, tuple[str, ...]] = {
    "source_only": ("source",),
    "daformer": _DAFORMER,  # DACS self-training with DAFormer's FD (method.md 4)
    "t2s": (*_DAFORMER, "pull"),  # T2S-DA w/ DAFormer (method.md 5)
    "dg": ("source", "pull"),  # domain generalisation: no target data (paper 4.2)
    "mic": (*_DAFORMER, "mic"),  # MIC on the DAFormer host (docs/method.md §6)
    "t2s_mic": (*_DAFORMER, "pull", "mic"),  # T2S-DA w/ MIC
    "masktwins": (*_DAFORMER, "masktwins"),  # MaskTwins on the DAFormer host (docs/method.md §7)
    # VFM-UDA (docs/hosts.md): DACS self-training and a masked target pass, no feature distance.
    "vfm_uda": ("source", "dacs", "mic"),
    "vfm_uda_fd": ("source", "dacs", "mic", "distillation"),  # + VFM-UDA++'s feature distillation
    "t2s_vfm_uda": ("source", "dacs", "pull", "mic"),  # T2S-DA w/ VFM-UDA
}
# Presets trained without any target image.
TARGET_FREE = ("source_only", "dg")


def term_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`config.terms` if set, else the preset of `config.method`."""
    names = tuple(config.terms)
    if not names:
        if config.method not in PRESETS:
            raise ValueError(f"config.method={config.method!r}; expected one of {tuple(PRESETS)} (or set config.terms)")
        names = PRESETS[config.method]
    unknown = [name for name in names if name not in TERMS]
    if unknown:
        raise ValueError(f"config.terms: unknown {unknown}; expected some of {tuple(TERMS)}")
    return names


def build_terms(config: ml_collections.ConfigDict) -> tuple[Term, ...]:
    """The run's terms, built (and their options checked) from the config."""
    terms = tuple(TERMS[name](config) for name in term_names(config))
    if not config.data.target:
        needing = [term.name for term in terms if term.needs_target]
        if needing:
            raise ValueError(
                f"config.method={config.method!r} trains on target images (terms {needing}) but "
                "config.data.target is empty; set it, or choose a target-free method "
                f"{TARGET_FREE}"
            )
    return terms


def needs_projector(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's model carries the T2S-DA projector (some term reads projections)."""
    return any(term.student_projection or term.teacher_projection for term in build_terms(config))


def needs_distill_head(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's model carries the feature-distillation head (some term distils)."""
    return any(term.student_distillation for term in build_terms(config))


def with_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """A copy of `config` that trains `method`, with the options a target-free method
    requires: no target data and, for the pulling term, a target-free pseudo-target engine
    (FDA -> colour jitter), no domain-equalised negatives, no re-weighting and source keys."""
    config = copy.deepcopy(config)  # keeps typed placeholders (mic.teacher_alpha) overridable
    config.method = method
    config.terms = ()
    if method in TARGET_FREE:
        config.data.target = ""
        pull = config.pull
        if pull.translation == "fda":
            pull.translation = "color_jitter"
        pull.domain_equalised_negatives = False
        pull.dynamic_reweighting = False
        pull.key_domain = "source"
        if pull.query_domain == "target":
            pull.query_domain = "pseudo_target"
    build_terms(config)
    return config
