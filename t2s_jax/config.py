"""The configuration schema: every knob of a run, with its default and why.

Benchmark files in `configs/` start from `default_config()` and override what they
change. Defaults follow `docs/method.md` (T2S-DA on a DAFormer host, MiT-B5,
GTA5 -> Cityscapes). Sizes are (height, width) everywhere.
"""

from __future__ import annotations

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
    for key, value in overrides.items():
        if key not in encoder:
            raise KeyError(f"unknown MiT encoder setting {key!r}; valid: {sorted(encoder)}")
        encoder[key] = value
    return encoder


def default_config() -> ml_collections.ConfigDict:
    """T2S-DA w/ DAFormer, MiT-B5, GTA5 -> Cityscapes: every value of method.md."""
    # Here, not at the top: the term modules import the models, whose weight loader reads
    # this module's defaults.
    from t2s_jax.uda import masktwins, mic, t2s

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

    # ---------------------------------------------------------------- model
    model = config.model = ml_collections.ConfigDict()
    model.encoder = mit_config("b5")
    model.head = "daformer"  # 'daformer' (separable-ASPP fusion) | 'segformer' (all-MLP)
    model.head_channels = 256  # DAFormer embedding/fusion width; SegFormer-B5 uses 768
    model.aspp_dilations = (6, 12, 18)  # DAFormer depthwise-separable ASPP branches
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
    model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16'; parameters stay float32
    # Each stage's repeated blocks as one block scanned over stacked parameters: XLA compiles a
    # stage once, not once per block (B5's 40-block stage), for a shorter first step.
    model.scan_blocks = True
    # What the backward pass keeps of each encoder block; the rest is recomputed (memory for
    # compute, models/layers.py REMAT_POLICIES): 'none' | 'full' | 'dots' | 'dots_no_batch'.
    # 'dots_no_batch' keeps the Linear outputs: the B5 T2S-DA step fits 20 GiB for +3 % FLOPs
    # (docs/performance.md).
    model.remat = "dots_no_batch"
    # jax.nn.dot_product_attention implementation: '' (let XLA choose) | 'xla' | 'cudnn'
    model.attention_impl = ""
    # MiT ImageNet weights for the encoder: a mmseg `.pth` or a Hugging Face directory; '' = random init.
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

    # ---------------------------------------------------------------- optimisation
    optim = config.optim = ml_collections.ConfigDict()
    optim.learning_rate = 6e-5
    optim.head_lr_multiplier = 10.0  # decoder head and projector
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.weight_decay = 0.01  # not applied to encoder LayerNorms
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
