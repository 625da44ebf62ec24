"""Every option of `pull.*`, `mic.*`, `masktwins.*`, `distill.*` and `uda.*` changes what its term computes.

Each term runs as the step runs it (batch transform, state update, prepare, losses) on a
fixed batch, with a fixed fake model in place of the network (a linear map of the pooled
pass images, so the outcome follows the images a term prepares), eagerly: no step compile.
Each case changes options from a base and names the output that must move; an option a
term ignored, or read under another name, leaves it unchanged and fails.

The host options the step itself reads (`uda.ema_max_alpha`, `uda.pseudo_threshold`,
`uda.pseudo_ignore_top`, `uda.pseudo_ignore_bottom`) are set to non-default values in
`test_reference_step.py`, whose reference reads them independently of the step;
`uda.teacher_flip` changes the step's mixed loss in `test_vfm.py`.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2s_jax import config as config_lib, methods
from t2s_jax.hosts import MaskedTokens, SingleScaleHost
from t2s_jax.models import SegmentorOutput, resize_bilinear
from t2s_jax.uda import pseudo_labels
from t2s_jax.uda.dacs import DacsTerm
from t2s_jax.uda.distillation import DistillationTerm
from t2s_jax.uda.feature_distance import FeatureDistanceTerm
from t2s_jax.uda.masktwins import MaskTwinsTerm
from t2s_jax.uda.mic import MicTerm
from t2s_jax.uda.source import SourceTerm
from t2s_jax.uda.t2s import PullTerm
from t2s_jax.uda.term import PseudoLabels, StepContext, stream_key

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402
from test_steps import _batch  # noqa: E402

K, D, C = 19, 16, 8  # classes, projection width, last encoder stage width of the fake model


def _weights(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _fake_model(params, images):
    """A fixed stand-in for the network: logits and features are linear in the pooled images."""
    b, h, w, _ = images.shape
    stride_4 = images.reshape(b, h // 4, 4, w // 4, 4, 3).mean((2, 4)) / 255.0 - 0.5
    stride_32 = images.reshape(b, h // 32, 32, w // 32, 32, 3).mean((2, 4)) / 255.0 - 0.5
    return SegmentorOutput(
        logits=4.0 * stride_4 @ params["logits"] + params["position"],
        encoder_features=(stride_32 @ params["encoder"],),
        decoder_features=None,
        projection=stride_4 @ params["projection"] + 0.3 * params["position"][..., :D],
        distillation=stride_32 @ params["encoder"] + 0.2,
    )


def _params(seed, hw):
    return {
        "logits": _weights(seed, (3, K)),
        "position": _weights(seed + 1, (hw[0] // 4, hw[1] // 4, K)),
        "encoder": _weights(seed + 2, (3, C)),
        "projection": _weights(seed + 3, (3, D)),
    }


STUDENT, TEACHER, IMAGENET = _params(0, (64, 64)), _params(10, (64, 64)), _params(20, (64, 64))


def _outcome(term_class, config, seed=0):
    """{loss/metric name: value, 'pass/<name>': pass images, 'state': the term's state} of one step."""
    term = term_class(config)
    batch = {k: jnp.asarray(v, jnp.float32 if k.endswith("_image") else jnp.int32) for k, v in _batch(seed).items()}
    batch = term.transform_batch(batch)
    step = jnp.asarray(3, jnp.int32)
    state = term.init_state(STUDENT)
    if state is not None:
        state = term.update_state(state, jax.tree.map(lambda x: x + 0.5, STUDENT), step)
    teacher = {view: _fake_model(TEACHER, batch[f"{view}_image"]) for view in ("source", "target")}
    uda = config.uda
    pseudo = PseudoLabels(*pseudo_labels.pseudo_labels(
        resize_bilinear(teacher["target"].logits, (64, 64)), threshold=uda.pseudo_threshold,
        ignore_top=uda.pseudo_ignore_top, ignore_bottom=uda.pseudo_ignore_bottom,
    ))  # fmt: skip
    step_key = jax.random.fold_in(jax.random.PRNGKey(seed), 7)
    context = StepContext(
        config=config, mesh=None, host=SingleScaleHost(), step=step, source_image=batch["source_image"],
        source_label=batch["source_label"], target_image=batch["target_image"], target_valid=None, teacher=teacher, pseudo=pseudo,
        imagenet_features=lambda images: _fake_model(IMAGENET, images).encoder_features[-1],
        teacher_forward=_fake_model, state=state,
        keys={stream: stream_key(step_key, term.name, stream) for stream in term.random_streams},
    )  # fmt: skip
    passes, prepared = term.prepare(context)
    assert set(passes) == set(term.student_passes)
    # The fake model sees no tokens: a token-masked pass is its (unmasked) images.
    passes = {name: p.images if isinstance(p, MaskedTokens) else p for name, p in passes.items()}
    student = {name: _fake_model(STUDENT, images) for name, images in passes.items()}
    student.update({name: _fake_model(STUDENT, batch["source_image"]) for name in term.reads_passes})
    term_losses, metrics = term.losses(context, student, prepared)
    outcome = {**term_losses, **metrics, **{f"pass/{name}": images for name, images in passes.items()}}
    if state is not None:
        outcome["state"] = state
    return jax.device_get(outcome)


def _config(method, overrides):
    config = tiny.tiny_config("unused", method, **{
        "mic.block_size": 16, "masktwins.block_size": 16, "uda.pseudo_threshold": 0.06, "uda.fd_weight": 0.005,
        **overrides,
    })  # fmt: skip
    return methods.with_method(config, method)


def _differs(a, b):
    return any(not np.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# (term, method, base overrides, changed overrides, the output that must change)
MIC = (MicTerm, "mic", {"uda.pseudo_threshold": 0.3})  # q < 1: the host weights are not all ones
TWINS = (MaskTwinsTerm, "masktwins", {})  # linear fake model: complementary views differ by the image, not the mask, in MSE
PULL = (PullTerm, "t2s", {"pull.fda_beta": 0.05})  # FDA at 0.01 moves no frequency of a 64 px crop
ALWAYS_AUGMENT = {"uda.color_jitter_prob": 1.0, "uda.blur_prob": 1.0}
DACS = (DacsTerm, "daformer", ALWAYS_AUGMENT)
FD = (FeatureDistanceTerm, "daformer", {})
DISTILL = (DistillationTerm, "vfm_uda_fd", {})
# Token masks leave the images whole (the ViT masks its tokens), pixel blocks do not.
TINY_VIT = config_lib.vit_config("s", embed_dim=32, depth=1, num_heads=2, pretrain_size=56)
CASES = {
    "mic.mask_type": (*MIC, {"mic.mask_type": "token", "model.encoder": TINY_VIT}, "pass/masked"),
    "uda.source_loss_mean": (SourceTerm, "source_only", {}, {"uda.source_loss_mean": "valid"}, "loss_source"),
    "distill.weight_source": (*DISTILL, {"distill.weight_source": 0.3}, "loss_distill_source"),
    "distill.weight_target": (*DISTILL, {"distill.weight_target": 0.3}, "loss_distill_target"),
    "distill.smooth_l1_weight": (*DISTILL, {"distill.smooth_l1_weight": 0.5}, "loss_distill_source"),
    "distill.cosine_weight": (*DISTILL, {"distill.cosine_weight": 0.5}, "loss_distill_source"),
    **{f"mic.mode={mode}": (*MIC, {"mic.mode": mode}, "loss_mic") for mode in
       ("separatetrg", "separatesrcaug", "separatesrc", "separateaug", "separate")},
    "mic.block_size": (*MIC, {"mic.block_size": 8}, "loss_mic"),
    "mic.ratio": (*MIC, {"mic.ratio": 0.3}, "loss_mic"),
    "mic.weight": (*MIC, {"mic.weight": 0.5}, "loss_mic"),
    "mic.teacher_alpha": (*MIC, {"mic.teacher_alpha": 0.5}, "loss_mic"),
    "mic.teacher_alpha=0.2/0.5": (MicTerm, "mic", {"mic.teacher_alpha": 0.5}, {"mic.teacher_alpha": 0.2}, "state"),
    "mic.pseudo_weighting=none": (*MIC, {"mic.pseudo_weighting": "none"}, "loss_mic"),
    "mic.pseudo_weighting=threshold": (
        *MIC, {"mic.pseudo_weighting": "threshold", "mic.pseudo_threshold": 0.2}, "loss_mic"),
    "mic.pseudo_threshold": (
        MicTerm, "mic", {"mic.pseudo_weighting": "threshold", "mic.pseudo_threshold": 0.1},
        {"mic.pseudo_threshold": 0.2}, "loss_mic"),
    "masktwins.block_size": (*TWINS, {"masktwins.block_size": 8}, "loss_twins"),
    "masktwins.ratio": (*TWINS, {"masktwins.ratio": 0.2}, "loss_twins"),
    "masktwins.num_views": (*TWINS, {"masktwins.num_views": 3}, "loss_twins"),
    "masktwins.complementary": (*TWINS, {"masktwins.complementary": False}, "loss_twins_consistency"),
    "masktwins.augment": (*TWINS, {"masktwins.augment": False}, "loss_twins"),
    "masktwins.weight": (*TWINS, {"masktwins.weight": 0.5}, "loss_twins"),
    "masktwins.consistency_weight": (*TWINS, {"masktwins.consistency_weight": 0.1}, "loss_twins_consistency"),
    "masktwins.single_target_image": (*TWINS, {"masktwins.single_target_image": True}, "loss_twins"),
    "pull.weight": (*PULL, {"pull.weight": 0.2}, "loss_pull"),
    "pull.loss": (*PULL, {"pull.loss": "mse"}, "pull_unweighted"),
    "pull.temperature": (*PULL, {"pull.temperature": 0.5}, "pull_unweighted"),
    "pull.translation=color_jitter": (*PULL, {"pull.translation": "color_jitter"}, "pass/pseudo_target"),
    "pull.translation=gaussian_blur": (*PULL, {"pull.translation": "gaussian_blur"}, "pass/pseudo_target"),
    "pull.fda_beta": (*PULL, {"pull.fda_beta": 0.1}, "pass/pseudo_target"),
    "pull.query_domain=source": (*PULL, {"pull.query_domain": "source"}, "pull_unweighted"),
    "pull.query_domain=target": (*PULL, {"pull.query_domain": "target"}, "pull_unweighted"),
    "pull.key_domain": (*PULL, {"pull.key_domain": "target"}, "pull_positive_similarity"),
    "pull.num_queries": (*PULL, {"pull.num_queries": 8}, "pull_num_queries"),
    "pull.class_balanced_queries": (*PULL, {"pull.class_balanced_queries": False}, "pull_num_queries"),
    "pull.num_negatives": (*PULL, {"pull.num_negatives": 8}, "pull_unweighted"),
    "pull.domain_equalised_negatives": (*PULL, {"pull.domain_equalised_negatives": False}, "pull_unweighted"),
    "pull.unreliable_fraction": (*PULL, {"pull.unreliable_fraction": 0.2}, "pull_unreliable_threshold"),
    "pull.dynamic_reweighting": (*PULL, {"pull.dynamic_reweighting": False}, "pull_unweighted"),
    "pull.reweight_scale": (*PULL, {"pull.reweight_scale": 3.0}, "pull_unweighted"),
    "pull.num_groups": (*PULL, {"pull.num_groups": 2}, "pull_unweighted"),
    "uda.color_jitter_semantics": (*DACS, {"uda.color_jitter_semantics": "torchvision"}, "pass/mixed"),
    "uda.augment_coins": (
        DacsTerm, "daformer", {"uda.color_jitter_prob": 0.5, "uda.blur_prob": 0.5}, {"uda.augment_coins": "image"},
        "pass/mixed"),
    "uda.color_jitter_prob": (*DACS, {"uda.color_jitter_prob": 0.0}, "pass/mixed"),
    "uda.color_jitter_strength": (*DACS, {"uda.color_jitter_strength": 0.4}, "pass/mixed"),
    "uda.color_jitter_hue": (*DACS, {"uda.color_jitter_hue": 0.05}, "pass/mixed"),
    "uda.blur_prob": (*DACS, {"uda.blur_prob": 0.0}, "pass/mixed"),
    "uda.blur_sigma": (*DACS, {"uda.blur_sigma": (2.0, 3.0)}, "pass/mixed"),
    "uda.blur_kernel_fraction": (*DACS, {"uda.blur_kernel_fraction": 0.3}, "pass/mixed"),
    "uda.fd_weight": (*FD, {"uda.fd_weight": 0.01}, "loss_fd"),
    "uda.fd_classes": (*FD, {"uda.fd_classes": (0, 1, 2, 3, 4)}, "loss_fd"),
    "uda.fd_min_ratio": (*FD, {"uda.fd_min_ratio": 0.2}, "loss_fd"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_option_changes_the_outcome(name):
    term_class, method, base, changed, output = CASES[name]
    # Two draws: a coin-gated option (per-image coins) need not act on every draw.
    before = [_outcome(term_class, _config(method, base), seed) for seed in (0, 1)]
    after = [_outcome(term_class, _config(method, {**base, **changed}), seed) for seed in (0, 1)]
    assert all(output in outcome for outcome in before + after), (output, sorted(before[0]))
    assert _differs([o[output] for o in before], [o[output] for o in after]), f"{name} did not change {output}"


def test_every_option_of_the_term_sections_has_a_case():
    config = tiny.tiny_config("unused")
    step_read = {"uda.ema_max_alpha", "uda.pseudo_threshold", "uda.pseudo_ignore_top", "uda.pseudo_ignore_bottom",
                 "uda.teacher_flip"}  # fmt: skip
    options = {f"{section}.{key}" for section in ("pull", "mic", "masktwins", "distill", "uda") for key in config[section]}
    covered = {key for case in CASES.values() for key in case[3] if not key.startswith("model.")}
    assert options - step_read == covered
