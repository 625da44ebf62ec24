"""The segmentor: encoder (MiT, ResNet or ViT) + decode head (+ T2S-DA projector, + HRDA scale
attention), built from `config.model`.

State is only `nnx.Param` and `nnx.BatchStat`; randomness (stochastic depth, channel
dropout) enters through `dropout_key`, so step functions can `nnx.split` the model, run a
pure function and `nnx.merge` / `nnx.update` the new BatchNorm statistics back.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import ml_collections
from flax import nnx

from t2s_jax.models import encoders, heads, layers
from t2s_jax.models.distillation import DistillationHead
from t2s_jax.models.hrda import build_scale_attention
from t2s_jax.models.projector import Projector

# Top-level attribute names: the optimizer gives these 10x learning rate.
HEAD_MODULES = ("head", "projector", "attention_head", "distill_head")
# Names of the encoder's LayerNorm modules (patch embedding, block pre-norms, spatial
# reduction `attn.norm`, stage end): no weight decay on their scale and bias.
ENCODER_NORM_MODULES = ("patch_norm", "norm1", "norm2", "norm")


@flax.struct.dataclass
class SegmentorOutput:
    logits: jax.Array  # (B, H/s, W/s, num_classes) float32, s = `Segmentor.output_stride`
    encoder_features: tuple[jax.Array, ...]  # 4 stages, NHWC (MiT: strides 4/8/16/32), compute dtype
    decoder_features: jax.Array  # the feature the classifier reads, before dropout, compute dtype
    projection: jax.Array | None = None  # unnormalised projector output, float32
    attention: jax.Array | None = None  # HRDA scale attention (B, H/s, W/s, K or 1) float32 in (0, 1)
    distillation: jax.Array | None = None  # the distillation head's map of the last stage, float32


class Segmentor(nnx.Module):
    """`.encoder` (MiT, ResNet or ViT), `.head` (DAFormer, SegFormer, DeepLab-V2 or VFM-UDA's),
    `.projector` (None unless enabled), `.attention_head` (HRDA scale attention; None unless
    `model.hrda.enabled`), `.distill_head` (None unless enabled; it runs on every forward)."""

    def __init__(self, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        dtype = layers.compute_dtype(model_config.dtype)
        bn = dict(bn_momentum=float(model_config.bn_momentum), bn_eps=float(model_config.bn_eps))
        self.encoder = encoders.build_encoder(model_config.encoder, model_config, rngs=rngs)
        embed_dims = self.encoder.embed_dims
        self.head = heads.build_head(model_config, embed_dims, dtype=dtype, rngs=rngs)
        self.output_stride = segmentor_output_stride(model_config)
        projector_config = model_config.projector
        self.projector_input = projector_config.input
        if projector_config.input not in ("decoder", "encoder"):
            raise ValueError(f"unknown projector input {projector_config.input!r}; expected 'decoder' or 'encoder'")
        if projector_config.enabled:
            in_channels = self.head.feature_channels if projector_config.input == "decoder" else embed_dims[-1]
            self.projector = Projector(
                in_channels,
                hidden_channels=int(projector_config.hidden_channels),
                dim=int(projector_config.dim),
                dtype=dtype,
                rngs=rngs,
                **bn,
            )
        else:
            self.projector = None
        self.head_remat = layers.check_remat(str(model_config.get("head_remat", "none")))
        self.head_per_pass = bool(model_config.get("head_per_pass", False))
        hrda = model_config.get("hrda")  # absent in model configs stored before HRDA
        enabled = hrda is not None and hrda.enabled
        self.attention_head = build_scale_attention(model_config, embed_dims, dtype=dtype, rngs=rngs) if enabled else None
        distill = model_config.get("distill_head")  # absent in model configs stored before it
        self.distill_head = (
            DistillationHead(embed_dims[-1], embed_dims[-1], expansion=int(distill.expansion), dtype=dtype, rngs=rngs)
            if distill is not None and distill.enabled
            else None
        )

    def __call__(self, images: jax.Array, *, train: bool = False, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits (B, H/s, W/s, num_classes) float32 for NHWC normalised `images` (s: `output_stride`)."""
        return self.forward(images, train=train, dropout_key=dropout_key).logits

    def forward(
        self,
        images: jax.Array,
        *,
        train: bool = False,
        use_batch_stats: bool | None = None,
        num_batch_groups: int = 1,
        dropout_key: jax.Array | None = None,
        with_projection: bool = False,
        with_attention: bool = False,
        token_mask: jax.Array | None = None,
    ) -> SegmentorOutput:
        """Run the model.

        train: stochastic depth and channel dropout on (needs `dropout_key`).
        use_batch_stats: BatchNorm normalises with the batch's statistics and updates its
            running statistics (default: `train`). The mean teacher uses train=False,
            use_batch_stats=True.
        num_batch_groups: the batch holds this many equal passes, interleaved example-major
            (`layers.stack_passes`), each normalised with its own BatchNorm statistics.
        with_projection: also run the projector.
        with_attention: also run the HRDA scale-attention head on the same encoder features
            (this pass is then the context pass).
        token_mask: (B, num_tokens) bool, patch tokens a ViT encoder replaces by its mask token.
        """
        if train and dropout_key is None:
            raise ValueError("Segmentor.forward(train=True) needs a dropout_key for stochastic depth and dropout")
        if with_projection and self.projector is None:
            raise ValueError("with_projection=True but this model was built without the projector")
        if with_attention and self.attention_head is None:
            raise ValueError("with_attention=True but this model was built without model.hrda.enabled")
        use_batch_stats = train if use_batch_stats is None else use_batch_stats
        encoder_key = head_key = None
        if train:
            encoder_key, head_key = jax.random.split(dropout_key)
        bn = dict(use_batch_stats=use_batch_stats, num_batch_groups=num_batch_groups)
        masking = {} if token_mask is None else dict(token_mask=token_mask)
        features = self.encoder(images, dropout_key=encoder_key, **bn, **masking)
        run = functools.partial(self._run_head, use_batch_stats=use_batch_stats, num_batch_groups=num_batch_groups)
        logits, fused = run(self.head, features, head_key)
        projection = None
        if with_projection:
            projector_input = fused if self.projector_input == "decoder" else features[-1]
            projection = run(self.projector, projector_input)
        attention = None
        if with_attention:
            # Its own key, derived apart from the split, so the encoder's and the head's
            # randomness do not depend on whether the attention runs.
            attention_key = jax.random.fold_in(dropout_key, 1) if train else None
            attention = run(self.attention_head, features, attention_key)
        distillation = None if self.distill_head is None else self.distill_head(features[-1])
        return SegmentorOutput(
            logits=logits,
            encoder_features=features,
            decoder_features=fused,
            projection=projection,
            attention=attention,
            distillation=distillation,
        )

    def _run_head(self, module, inputs, key=None, *, use_batch_stats: bool, num_batch_groups: int):
        """`module(inputs)` for a head, the projector or the attention head, under `head_remat`;
        with `head_per_pass`, pass by pass: each pass has its own BatchNorm statistics, so only
        the channel-dropout draws differ, and the backward pass holds one pass's activations
        at a time."""

        def rematerialised_call(groups: int):
            def call(module, inputs, key):
                kwargs = {} if key is None else dict(dropout_key=key)
                return module(inputs, use_batch_stats=use_batch_stats, num_batch_groups=groups, **kwargs)

            return layers.checkpoint_module_call(call, self.head_remat)

        if not self.head_per_pass or num_batch_groups == 1:
            return rematerialised_call(num_batch_groups)(module, inputs, key)
        call_one = rematerialised_call(1)
        outputs = []
        for index in range(num_batch_groups):
            pass_inputs = jax.tree.map(lambda x, i=index: layers.unstack_passes(x, num_batch_groups)[i], inputs)
            outputs.append(call_one(module, pass_inputs, None if key is None else jax.random.fold_in(key, index)))
        return jax.tree.map(lambda *per_pass: layers.stack_passes(list(per_pass)), *outputs)


def build_segmentor(model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> Segmentor:
    """The segmentor `config.model` describes (random init; see `weights.load_pretrained_encoder`)."""
    return Segmentor(model_config, rngs=rngs)


def segmentor_output_stride(model_config: ml_collections.ConfigDict) -> float:
    """Input pixels per logit of the segmentor `config.model` describes: the stride-4 fusion of
    the MiT-style heads, the last stage's stride for DeepLab-V2, a quarter of the ViT patch
    (of the resized input) for VFM-UDA's head."""
    strides = encoders.output_strides(model_config.encoder)
    if model_config.head == "vfm":
        return strides[-1] / 4
    return strides[-1] if model_config.head == "deeplabv2" else strides[0]


def is_head_param(path: tuple) -> bool:
    """Decode head, projector or scale-attention parameter (learning rate x head_lr_multiplier)."""
    return bool(path) and path[0] in HEAD_MODULES


def is_encoder_norm_param(path: tuple) -> bool:
    """Scale or bias of an encoder LayerNorm (no weight decay), stacked (scanned) or not."""
    return len(path) >= 2 and path[0] == "encoder" and path[-2] in ENCODER_NORM_MODULES
