"""The configuration schema: every knob of a run, with its default and why.

Benchmark files in `configs/` start from `default_config()` (through `t2s_jax/benchmarks.py`)
and override what they change. Defaults follow `docs/method.md` (T2S-DA on a DAFormer host,
MiT-B5, GTA5 -> Cityscapes). Sizes are (height, width) everywhere. `RULES` says what each value
outside the loss terms' sections may be; `check` applies them before a run builds anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

# Cityscapes train ids of "thing" classes (traffic light, sign, person .. bicycle),
# the cells the ImageNet feature distance is computed on.
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)

# MiT (SegFormer) encoder variants, method.md section 3.
_MIT_WIDE = (64, 128, 320, 512)
MIT_VARIANTS = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": dict(embed_dims=_MIT_WIDE, depths=(2, 2, 2, 2)),
    "b2": dict(embed_dims=_MIT_WIDE, depths=(3, 4, 6, 3)),
    "b3": dict(embed_dims=_MIT_WIDE, depths=(3, 4, 18, 3)),
    "b4": dict(embed_dims=_MIT_WIDE, depths=(3, 8, 27, 3)),
    "b5": dict(embed_dims=_MIT_WIDE, depths=(3, 6, 40, 3)),
}


def mit_config(variant: str = "b5", **overrides) -> ml_collections.ConfigDict:
    """Encoder settings of MiT-`variant`; `overrides` shrink it for tests and demos."""
    if variant not in MIT_VARIANTS:
        raise ValueError(f"unknown MiT variant {variant!r}; expected one of {sorted(MIT_VARIANTS)}")
    encoder = ml_collections.ConfigDict(
        dict(
            type="mit",
            embed_dims=MIT_VARIANTS[variant]["embed_dims"],
            depths=MIT_VARIANTS[variant]["depths"],
            num_heads=(1, 2, 5, 8),
            sr_ratios=(8, 4, 2, 1),
            mlp_ratio=4,
            drop_path_rate=0.1,  # stochastic depth, linear 0..rate over all blocks
            embed_norm_eps=1e-5,  # LayerNorm after each overlap patch embedding and in spatial reduction
            block_norm_eps=1e-6,  # pre-norm of blocks and stage-end norm (mmseg); the HF port uses 1e-5
        )
    )
    return _overridden(encoder, overrides, "MiT")


# ResNet bottleneck blocks per stage (He et al.), docs/hosts.md.
RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def resnet_config(depth: int = 101, **overrides) -> ml_collections.ConfigDict:
    """Encoder settings of ResNet-`depth` as DAFormer's DeepLab-V2 uses it (mmcv ResNetV1c: the
    deep stem, output stride 8 by dilating stages 3 and 4); `overrides` shrink it for tests."""
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"unknown ResNet depth {depth!r}; expected one of {sorted(RESNET_DEPTHS)}")
    encoder = ml_collections.ConfigDict(
        dict(
            type="resnet",
            depths=RESNET_DEPTHS[depth],
            base_widths=(64, 128, 256, 512),  # bottleneck widths; stage outputs are 4x these
            # 'deep': three 3x3 convs (mmcv ResNetV1c, resnet101_v1c weights); '7x7': torchvision's stem
            stem="deep",
            stem_channels=64,
            strides=(1, 2, 1, 1),
            dilations=(1, 1, 2, 4),
            contract_dilation=True,  # the first block of a dilated stage uses half the dilation
        )
    )
    return _overridden(encoder, overrides, "ResNet")


# DINOv2 ViT/14 variants (facebookresearch/dinov2 hub models), docs/hosts.md.
VIT_VARIANTS = {
    "s": dict(embed_dim=384, depth=12, num_heads=6, ffn="mlp"),
    "b": dict(embed_dim=768, depth=12, num_heads=12, ffn="mlp"),
    "l": dict(embed_dim=1024, depth=24, num_heads=16, ffn="mlp"),
    "g": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


def vit_config(variant: str = "b", **overrides) -> ml_collections.ConfigDict:
    """Encoder settings of DINOv2 ViT-`variant`/14 ('s' | 'b' | 'l' | 'g') as VFM-UDA uses it: the
    crop resized by 1.1 (1024 -> 1120, 80x80 tokens), the 37x37 position grid of the 518^2
    pre-training interpolated as the hub code does; `overrides` shrink it for tests."""
    if variant not in VIT_VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; expected one of {sorted(VIT_VARIANTS)}")
    encoder = ml_collections.ConfigDict(
        dict(
            type="vit",
            **VIT_VARIANTS[variant],
            patch_size=14,
            mlp_ratio=4,
            num_register_tokens=0,  # 4 for the *_reg models
            pretrain_size=518,  # the checkpoint's position embeddings cover 518/14 = 37^2 patches
            # 'hub': DINOv2's own bicubic with its +0.1 scale-factor offset (VFM-UDA) | 'size':
            # Hugging Face Dinov2Model's | 'size_antialias': the hub *_reg models'
            pos_interpolation="hub",
            layerscale_init=1.0,  # LayerScale gamma at random init; checkpoints hold their own
            drop_path_rate=0.0,
            norm_eps=1e-6,
            # The crop is resized to floor(side * input_scale / patch) * patch first (VFM-UDA: 1024 -> 1120).
            input_scale=1.1,
        )
    )
    return _overridden(encoder, overrides, "ViT")


def _overridden(encoder: ml_collections.ConfigDict, overrides: dict, name: str) -> ml_collections.ConfigDict:
    for key, value in overrides.items():
        if key not in encoder or key == "type":
            raise KeyError(f"unknown {name} encoder setting {key!r}; valid: {sorted(set(encoder) - {'type'})}")
        encoder[key] = value
    return encoder


def default_config() -> ml_collections.ConfigDict:
    """T2S-DA w/ DAFormer, MiT-B5, GTA5 -> Cityscapes: every value of method.md."""
    # Here, not at the top: the term modules import the models, whose weight loader reads
    # this module's defaults.
    from t2s_jax.uda import distillation, masktwins, mic, t2s

    config = ml_collections.ConfigDict()
    config.seed = 0
    # A preset of loss terms (t2s_jax/methods.py): 'source_only' | 'daformer' (DACS
    # self-training) | 't2s' (DAFormer + pulling loss) | 'dg' (domain generalisation: no
    # target data, L_src + lambda * L_pull) | 'mic' | 't2s_mic' (T2S-DA w/ MIC) | 'masktwins'.
    config.method = "t2s"
    # The loss terms themselves, overriding the preset: names from t2s_jax/methods.py TERMS,
    # e.g. ('source', 'feature_distance', 'dacs', 'pull', 'mic'); () = the preset's.
    config.terms = ()
    config.num_devices = 0  # devices of the data mesh; 0 = every device of every process
    # Several presets trained one after the other in <workdir>/<method>, their mIoU side by side
    # (the demo); () = train `method` alone.
    config.compare_methods = ()
    config.compare_seeds = ()  # with compare_methods: every method once per seed; () = `seed` alone

    # ---------------------------------------------------------------- model
    model = config.model = ml_collections.ConfigDict()
    model.encoder = mit_config("b5")
    # 'daformer' (separable-ASPP fusion) | 'segformer' (all-MLP) | 'deeplabv2' (dilated 3x3
    # convs on the last stage, summed: DeepLab-V2) | 'vfm' (VFM-UDA's upscaling head on ViT tokens)
    model.head = "daformer"
    model.head_channels = 256  # DAFormer embedding/fusion width; SegFormer-B5 uses 768
    # DAFormer: its depthwise-separable ASPP branches; DeepLab-V2: (6, 12) is DAFormer's
    # `dlv2red`, (6, 12, 18, 24) the original four-rate head.
    model.aspp_dilations = (6, 12, 18)
    model.dropout_rate = 0.1  # channel dropout before the classifier
    model.num_classes = 19
    model.bn_momentum = 0.9  # Flax convention (PyTorch momentum 0.1)
    model.bn_eps = 1e-5
    # The T2S-DA projector, built when a term of the method reads projections (pull).
    model.projector = ml_collections.ConfigDict()
    # [our choice] 'decoder': fused 256-ch stride-4 decoder feature; 'encoder': last encoder stage.
    model.projector.input = "decoder"
    model.projector.hidden_channels = 256
    model.projector.dim = 256
    # Set by the run from the method (training.train_state.model_config_for_run: a term reads projections);
    # the value given here is replaced.
    model.projector.enabled = False
    # VFM-UDA++'s feature-distillation head on the last encoder stage (models/distillation.py),
    # built when a term distils (`distillation`); set by the run like the projector's.
    model.distill_head = ml_collections.ConfigDict()
    model.distill_head.expansion = 4  # hidden width / encoder width
    model.distill_head.enabled = False
    # HRDA multi-resolution training and inference (docs/hosts.md): the encoder and head run on
    # the crop at `context_scale` and on a detail crop at full resolution, fused by a learned
    # class-wise scale attention. Off: the single-scale host.
    model.hrda = ml_collections.ConfigDict()
    model.hrda.enabled = False
    model.hrda.context_scale = 0.5
    model.hrda.detail_crop_hw = (512, 512)  # full-resolution detail crop inside the training crop
    model.hrda.crop_divisible = 8  # detail-box offsets are multiples of this (output stride / context scale)
    model.hrda.attention_classwise = True  # one attention map per class (False: one for all)
    model.hrda.attention_channels = 256
    model.hrda.detail_loss_weight = 0.1  # CE of the detail logits on the labels in their box
    model.hrda.context_loss_weight = 0.0  # CE of the context logits; the fused CE gets 1 - both
    # The teacher's and evaluation's detail branch: windows of detail_crop_hw at this stride over
    # the context crop (512 / 256: 9 overlapping windows of a 1024 crop).
    model.hrda.detail_slide_stride_hw = (256, 256)
    model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16'; parameters stay float32
    # Each stage's repeated blocks as one block scanned over stacked parameters: XLA compiles a
    # stage once, not once per block (B5's 40-block stage), for a shorter first step.
    model.scan_blocks = True
    # What the backward pass keeps of each encoder block; the rest is recomputed (memory for
    # compute, models/layers.py REMAT_POLICIES): 'none' | 'full' | 'dots' | 'dots_no_batch'.
    # 'dots_no_batch' keeps the Linear outputs: the B5 T2S-DA step fits 20 GiB for +3 % FLOPs
    # (docs/performance.md).
    model.remat = "dots_no_batch"
    # The same for the decode head, the projector and HRDA's attention head, each as one unit
    # (with head_per_pass and remat='full', HRDA + MIC + T2S-DA at 1024^2 compiles to 28.7 GiB
    # against 30.2 GiB; docs/performance.md).
    model.head_remat = "none"
    # Run those heads pass by pass (each pass has its own BatchNorm statistics anyway; only the
    # channel-dropout draws differ), so the backward pass holds one pass's head activations at
    # a time, not those of every pass of the step.
    model.head_per_pass = False
    # jax.nn.dot_product_attention implementation: '' (let XLA choose) | 'xla' | 'cudnn' |
    # 'chunked' (queries in chunks, each recomputed in the backward pass: bounded memory on any
    # backend, models/layers.py)
    model.attention_impl = ""
    # ImageNet weights for the encoder, '' = random init. MiT: a mmseg `.pth` or a Hugging Face
    # directory; ResNet: a mmcv (resnet101_v1c) or torchvision `.pth`.
    model.pretrained = ""

    # ---------------------------------------------------------------- data
    data = config.data = ml_collections.ConfigDict()
    data.data_dir = "data/tfds"  # where `python -m data_pipelines.prepare` wrote the datasets
    data.source = "gta5"  # prepared TFDS name: gta5 | synthia | cityscapes | image_folder | synthetic_city/source
    data.target = "cityscapes"  # '' for domain generalisation (no target data)
    data.source_split = "train"
    data.target_split = "train"
    data.source_resize_hw = (720, 1280)  # fit inside, keeping the aspect ratio (GTA5 -> 704x1280)
    data.target_resize_hw = (512, 1024)  # fit inside, keeping the aspect ratio (Cityscapes -> 512x1024)
    data.crop_hw = (512, 512)
    data.cat_max_ratio = 0.75  # source crops: redraw until the largest class is below this share
    data.crop_retries = 10
    data.flip_prob = 0.5
    data.rcs = ml_collections.ConfigDict()
    data.rcs.enabled = True  # rare class sampling on the source
    data.rcs.temperature = 0.01
    data.rcs.min_pixels = 3000  # a file is a candidate for class c with more pixels of c than this
    data.rcs.min_crop_pixels = 1500  # re-crop until the crop holds more pixels of c than this
    # HRDA's pseudo-label validity (v2): target pixels within (top, bottom, left, right) of the
    # stored image's borders get weight 0, carried through the resize, crop and flip of each
    # image (HRDA: (30, 240, 30, 30) on 1024x2048); () = off (DAFormer's crop rows, uda.pseudo_ignore_*).
    data.pseudo_margins = ()
    data.batch_size = 2  # global images per domain per step (B)
    data.num_workers = 4  # grain worker processes per host; 0 = in the main process
    data.prefetch = 2  # batches prefetched to the devices
    data.eval_dataset = "cityscapes"
    data.eval_split = "validation"
    data.eval_resize_hw = (512, 1024)  # network input size; predictions are scored at label size
    data.eval_batch_size = 1  # global
    data.max_eval_examples = 0  # 0 = the whole split

    # ---------------------------------------------------------------- DAFormer self-training
    uda = config.uda = ml_collections.ConfigDict()
    uda.ema_max_alpha = 0.999  # alpha_t = min(1 - 1/(t+1), ema_max_alpha)
    # Pseudo-labels from the mean of the teacher's softmax on the target and on its mirror
    # image, flipped back (VFM-UDA); False: one teacher pass (DAFormer).
    uda.teacher_flip = False
    # The source CE's mean: over 'all' B*H*W pixels, ignored ones counting 0 (DAFormer, mmseg) |
    # over the 'valid' (non-ignored) pixels (VFM-UDA, PyTorch's cross_entropy).
    uda.source_loss_mean = "all"
    uda.pseudo_threshold = 0.968  # confidence for the pseudo-label quality q
    uda.pseudo_ignore_top = 15  # crop rows [0, top) get weight 0
    uda.pseudo_ignore_bottom = 120  # crop rows [H-bottom, H) get weight 0 (ego car)
    uda.color_jitter_semantics = "kornia"  # 'kornia' (DAFormer's kornia 0.5.8 ColorJitter) | 'torchvision'
    uda.augment_coins = "batch"  # jitter / blur on-off coins: 'batch' (DAFormer: one per step) | 'image'
    uda.color_jitter_prob = 0.8  # DAFormer: jitter iff a U(0, 1) coin > 0.2
    uda.color_jitter_strength = 0.2  # brightness, contrast, saturation
    uda.color_jitter_hue = 0.2
    uda.blur_prob = 0.5  # DAFormer: blur iff a U(0, 1) coin > 0.5
    uda.blur_sigma = (0.15, 1.15)
    uda.blur_kernel_fraction = 0.1  # kernel = odd(fraction * crop side): 51 for 512 crops
    uda.fd_weight = 0.005  # ImageNet feature distance on thing-class cells; 0 disables
    uda.fd_classes = THING_CLASSES
    uda.fd_min_ratio = 0.75  # a stride-32 cell counts when one thing class covers this share

    # The terms' own sections, defined next to their code (t2s_jax/uda/).
    config.mic = mic.default_options()  # MIC (docs/method.md §6)
    config.masktwins = masktwins.default_options()  # MaskTwins (docs/method.md §7)
    config.pull = t2s.default_options()  # the T2S-DA pulling loss (method.md 5)
    config.distill = distillation.default_options()  # feature distillation (VFM-UDA++, docs/hosts.md)

    # ---------------------------------------------------------------- optimisation
    optim = config.optim = ml_collections.ConfigDict()
    optim.learning_rate = 6e-5
    optim.head_lr_multiplier = 10.0  # decoder head and projector
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.weight_decay = 0.01
    optim.exempt_encoder_norms = True  # no weight decay on encoder LayerNorms (DAFormer; VFM-UDA decays all)
    # ViT encoders: block i of L trains at layer_decay^(L-1-i) x learning_rate, the embeddings at
    # layer_decay^L (VFM-UDA++: 0.9); 1.0 = off.
    optim.layer_decay = 1.0
    optim.warmup_steps = 1500
    optim.warmup_ratio = 1e-6
    optim.poly_power = 1.0

    # ---------------------------------------------------------------- loop
    train = config.train = ml_collections.ConfigDict()
    train.num_steps = 40_000
    train.log_every = 50
    train.eval_every = 4_000
    train.checkpoint_every = 4_000
    train.keep_checkpoints = 3  # plus the best by mIoU
    train.num_pictures = 4  # prediction pictures written per evaluation

    # ---------------------------------------------------------------- evaluation
    evaluation = config.eval = ml_collections.ConfigDict()
    evaluation.mode = "whole"  # 'whole' | 'slide'
    evaluation.slide_crop_hw = (512, 512)
    evaluation.slide_stride_hw = (341, 341)
    return config


# ---------------------------------------------------------------------------- what values may be


class ConfigError(ValueError):
    """A config value, file or argument that cannot work; the command reports it in one line."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a config value may be: `expected` words it for the one-line error."""

    expected: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(minimum: int) -> Rule:
    return Rule(f"an integer >= {minimum}", lambda v: _is_int(v) and v >= minimum)


def number(low: float, high: float = float("inf"), *, open_low: bool = False, open_high: bool = False) -> Rule:
    """A number in [low, high], each end open where asked."""
    bounds = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or high == float('inf') else ']'}"

    def accepts(v: Any) -> bool:
        return _is_number(v) and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    return Rule(f"a number in {bounds}", accepts)


def one_of(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(map(repr, choices))}", lambda v: isinstance(v, str) and v in choices)


def integers(length: int | None, minimum: int, example: str) -> Rule:
    """A tuple of `length` integers >= `minimum` (any length if None)."""
    count = "" if length is None else f"{length} "
    def accepts(v: Any) -> bool:
        return isinstance(v, tuple) and len(v) == (len(v) if length is None else length) and all(_is_int(x) and x >= minimum for x in v)

    return Rule(f"a tuple of {count}integers >= {minimum}, e.g. {example}", accepts)


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
PROBABILITY = number(0, 1)
HW = integers(2, 1, "(512, 512) (height, width)")
STAGES = integers(4, 1, "(64, 128, 320, 512) (one per MiT stage)")
BOOL = Rule("True or False", lambda v: isinstance(v, bool))
TEXT = Rule("text", lambda v: isinstance(v, str))
NAME = Rule("a non-empty name", lambda v: isinstance(v, str) and bool(v))
NAMES = Rule(
    "a tuple of names, e.g. ('daformer', 't2s')", lambda v: isinstance(v, tuple) and all(isinstance(x, str) and x for x in v)
)

# The values the model and evaluation accept (tests/test_config_schema.py ties each to the
# code that implements it).
HEADS = ("daformer", "segformer", "deeplabv2", "vfm")
ENCODER_TYPES = ("mit", "resnet", "vit")
VIT_FFNS = ("mlp", "swiglu")
POS_INTERPOLATIONS = ("hub", "size", "size_antialias")
SOURCE_LOSS_MEANS = ("all", "valid")
RESNET_STEMS = ("deep", "7x7")
PROJECTOR_INPUTS = ("decoder", "encoder")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("", "xla", "cudnn", "chunked")
EVAL_MODES = ("whole", "slide")

# The keys of `model.encoder` beyond its `type`, per type.
ENCODER_RULES: dict[str, dict[str, Rule]] = {
    "mit": {
        "embed_dims": STAGES,
        "depths": integers(4, 1, "(3, 6, 40, 3) (one per MiT stage)"),
        "num_heads": integers(4, 1, "(1, 2, 5, 8) (one per MiT stage)"),
        "sr_ratios": integers(4, 1, "(8, 4, 2, 1) (one per MiT stage)"),
        "mlp_ratio": POSITIVE,
        "drop_path_rate": number(0, 1, open_high=True),
        "embed_norm_eps": number(0, open_low=True),
        "block_norm_eps": number(0, open_low=True),
    },
    "resnet": {
        "depths": integers(4, 1, "(3, 4, 23, 3) (one per ResNet stage)"),
        "base_widths": integers(4, 1, "(64, 128, 256, 512) (one per ResNet stage)"),
        "stem": one_of(*RESNET_STEMS),
        "stem_channels": Rule("an even integer >= 2, e.g. 64", lambda v: _is_int(v) and v >= 2 and v % 2 == 0),
        "strides": integers(4, 1, "(1, 2, 1, 1) (one per ResNet stage)"),
        "dilations": integers(4, 1, "(1, 1, 2, 4) (one per ResNet stage)"),
        "contract_dilation": BOOL,
    },
    "vit": {
        "embed_dim": POSITIVE,
        "depth": POSITIVE,
        "num_heads": POSITIVE,
        "ffn": one_of(*VIT_FFNS),
        "patch_size": POSITIVE,
        "mlp_ratio": POSITIVE,
        "num_register_tokens": NON_NEGATIVE,
        "pretrain_size": POSITIVE,
        "pos_interpolation": one_of(*POS_INTERPOLATIONS),
        "layerscale_init": number(0),
        "drop_path_rate": number(0, 1, open_high=True),
        "norm_eps": number(0, open_low=True),
        "input_scale": number(0, open_low=True),
    },
}

# Every key outside the loss terms' sections (uda, mic, masktwins, pull, distill: each term
# checks its own options when it is built), checked by `check` before anything is built.
RULES: dict[str, Rule] = {
    "seed": NON_NEGATIVE,
    "method": NAME,  # presets: t2s_jax/methods.py, checked by the command
    "terms": NAMES,
    "num_devices": NON_NEGATIVE,
    "compare_methods": NAMES,
    "compare_seeds": integers(None, 0, "(0, 1, 2)"),
    "model.encoder.type": one_of(*ENCODER_TYPES),
    "model.head": one_of(*HEADS),
    "model.head_channels": POSITIVE,
    "model.aspp_dilations": integers(None, 1, "(6, 12, 18)"),
    "model.dropout_rate": number(0, 1, open_high=True),
    "model.num_classes": POSITIVE,
    "model.bn_momentum": PROBABILITY,
    "model.bn_eps": number(0, open_low=True),
    "model.projector.input": one_of(*PROJECTOR_INPUTS),
    "model.projector.hidden_channels": POSITIVE,
    "model.projector.dim": POSITIVE,
    "model.projector.enabled": Rule("False (the run sets it from the method's terms)", lambda v: v is False),
    "model.distill_head.expansion": POSITIVE,
    "model.distill_head.enabled": Rule("False (the run sets it from the method's terms)", lambda v: v is False),
    "model.hrda.enabled": BOOL,
    "model.hrda.context_scale": number(0, 1, open_low=True, open_high=True),
    "model.hrda.detail_crop_hw": HW,
    "model.hrda.crop_divisible": POSITIVE,
    "model.hrda.attention_classwise": BOOL,
    "model.hrda.attention_channels": POSITIVE,
    "model.hrda.detail_loss_weight": number(0, 1),
    "model.hrda.context_loss_weight": number(0, 1),
    "model.hrda.detail_slide_stride_hw": HW,
    "model.dtype": one_of(*DTYPES),
    "model.scan_blocks": BOOL,
    "model.remat": one_of(*REMAT),
    "model.head_remat": one_of(*REMAT),
    "model.head_per_pass": BOOL,
    "model.attention_impl": one_of(*ATTENTION_IMPLS),
    "model.pretrained": TEXT,
    "data.data_dir": NAME,
    "data.source": NAME,
    "data.target": TEXT,
    "data.source_split": NAME,
    "data.target_split": NAME,
    "data.source_resize_hw": HW,
    "data.target_resize_hw": HW,
    "data.crop_hw": HW,
    "data.cat_max_ratio": number(0, 1, open_low=True),
    "data.crop_retries": NON_NEGATIVE,
    "data.flip_prob": PROBABILITY,
    "data.rcs.enabled": BOOL,
    "data.rcs.temperature": number(0, open_low=True),
    "data.rcs.min_pixels": NON_NEGATIVE,
    "data.rcs.min_crop_pixels": NON_NEGATIVE,
    "data.pseudo_margins": Rule(
        "() or a tuple of 4 integers >= 0 (top, bottom, left, right), e.g. (30, 240, 30, 30)",
        lambda v: v == () or (isinstance(v, tuple) and len(v) == 4 and all(_is_int(x) and x >= 0 for x in v)),
    ),
    "data.batch_size": POSITIVE,
    "data.num_workers": NON_NEGATIVE,
    "data.prefetch": NON_NEGATIVE,
    "data.eval_dataset": NAME,
    "data.eval_split": NAME,
    "data.eval_resize_hw": HW,
    "data.eval_batch_size": POSITIVE,
    "data.max_eval_examples": NON_NEGATIVE,
    "optim.learning_rate": number(0, open_low=True),
    "optim.head_lr_multiplier": number(0, open_low=True),
    "optim.b1": number(0, 1, open_high=True),
    "optim.b2": number(0, 1, open_high=True),
    "optim.weight_decay": number(0),
    "optim.exempt_encoder_norms": BOOL,
    "optim.layer_decay": number(0, 1, open_low=True),
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.warmup_ratio": PROBABILITY,
    "optim.poly_power": number(0),
    "train.num_steps": POSITIVE,
    "train.log_every": POSITIVE,
    "train.eval_every": POSITIVE,
    "train.checkpoint_every": POSITIVE,
    "train.keep_checkpoints": POSITIVE,
    "train.num_pictures": NON_NEGATIVE,
    "eval.mode": one_of(*EVAL_MODES),
    "eval.slide_crop_hw": HW,
    "eval.slide_stride_hw": HW,
}


def value_of(config: ml_collections.ConfigDict, key: str) -> Any:
    """`config.<key>` for a dotted key such as 'data.crop_hw'."""
    for part in key.split("."):
        config = config[part]
    return config


def rules_for(config: ml_collections.ConfigDict) -> dict[str, Rule]:
    """`RULES` and the rules of the keys of `config`'s encoder type."""
    encoder_rules = ENCODER_RULES.get(config.model.encoder.get("type"), {})
    return {**RULES, **{f"model.encoder.{key}": rule for key, rule in encoder_rules.items()}}


def expected(config: ml_collections.ConfigDict, key: str) -> str:
    """What `config.<key>` may be: its rule's words, else its current value's type."""
    rules = rules_for(config)
    if key in rules:
        return rules[key].expected
    value = value_of(config, key)
    kinds = ((bool, BOOL.expected), (int, "an integer"), (float, "a number"), (str, "text"), (tuple, "a tuple"))
    for kind, words in kinds:
        if isinstance(value, kind):
            return words
    return type(value).__name__


def check(config: ml_collections.ConfigDict) -> list[str]:
    """One line per value of `config` that breaks its rule (type or range), naming the key,
    and one per setting that excludes another."""
    problems = []
    for key, rule in rules_for(config).items():
        try:
            value = value_of(config, key)
        except (KeyError, AttributeError):  # an encoder type set without its settings
            kind = config.model.encoder.type
            problems.append(f"config.{key} is missing for encoder type {kind!r}: build the encoder with t2s_jax.config.{kind}_config()")
            continue
        if not rule.accepts(value):
            problems.append(f"config.{key}={value!r}: expected {rule.expected}")
    if config.optim.layer_decay != 1.0 and config.model.encoder.type != "vit":
        problems.append(
            f"config.optim.layer_decay={config.optim.layer_decay!r} decays the blocks of a ViT encoder; "
            f"config.model.encoder.type is {config.model.encoder.type!r}: set it to 1.0"
        )
    if (config.model.head == "vfm") != (config.model.encoder.type == "vit"):
        problems.append(
            f"config.model.head={config.model.head!r} with config.model.encoder.type={config.model.encoder.type!r}: "
            "the 'vfm' head reads a ViT's patch tokens and a ViT feeds only the 'vfm' head"
        )
    # HRDA's v2 pseudo-label validity replaces DAFormer's crop rows (HRDA asserts the rows are 0).
    rows = {key: config.uda[key] for key in ("pseudo_ignore_top", "pseudo_ignore_bottom") if config.uda[key]}
    if config.data.pseudo_margins and rows:
        problems.append(
            f"config.data.pseudo_margins={config.data.pseudo_margins!r} replaces the crop rows of "
            + " and ".join(f"config.uda.{key}={value!r}" for key, value in rows.items())
            + "; set those to 0 or config.data.pseudo_margins=()"
        )
    return problems
