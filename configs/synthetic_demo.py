"""The built-in demo: source-only, DAFormer and T2S-DA on the synthetic domain pair, on a CPU.

`python -m t2s_jax.main --config=configs/synthetic_demo.py --workdir=runs/demo` trains the three
methods one after the other on `synthetic_city/source` -> `synthetic_city/target` (generated on
first use, no download), evaluates each on the synthetic target's val split and prints their
per-class IoU side by side. A tiny MiT keeps it to minutes on 2 CPU cores.
"""

from t2s_jax.config import default_config, mit_config


def get_config():
    config = default_config()
    config.compare_methods = ("source_only", "daformer", "t2s")
    config.compare_seeds = ()  # e.g. (0, 1, 2): every method once per seed, mean +- std reported

    config.model.encoder = mit_config(
        "b0", embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)
    )
    # One block per stage and a few MB of activations: nothing to scan or rematerialise.
    config.model.scan_blocks = False
    config.model.remat = "none"
    config.model.head_channels = 64
    config.model.projector.hidden_channels = 64
    config.model.projector.dim = 64

    data = config.data
    data.data_dir = "data/tfds"
    data.source = "synthetic_city/source"
    data.target = "synthetic_city/target"
    data.eval_dataset = "synthetic_city/target"
    data.eval_split = "val"
    data.source_resize_hw = (128, 256)  # the generator's size: no resize
    data.target_resize_hw = (128, 256)
    data.eval_resize_hw = (128, 256)
    data.crop_hw = (128, 128)
    # Pixel thresholds of rare class sampling scaled from 1280x720 / 512^2 to 128x256 / 128^2.
    data.rcs.min_pixels = 100
    data.rcs.min_crop_pixels = 50
    data.batch_size = 2
    data.num_workers = 0  # 2 cores: the step needs them more than the tiny host transforms
    data.eval_batch_size = 8

    # No ego vehicle and no ImageNet encoder in the synthetic world.
    config.uda.pseudo_ignore_top = 0
    config.uda.pseudo_ignore_bottom = 0
    config.uda.fd_weight = 0.0

    config.pull.num_negatives = 256

    # Random init (no ImageNet weights): 10x DAFormer's fine-tuning rate. The steps are most of
    # the demo's time (T2S-DA's cost over DAFormer is its two extra passes, not the pulling
    # loss); 200 per method: about 13 minutes for the three on a 2-core CPU (README).
    config.optim.learning_rate = 6e-4
    config.optim.warmup_steps = 20
    config.train.num_steps = 200
    config.train.log_every = 50
    config.train.eval_every = 200
    # One save per method: a stop signal still saves the step it stops at.
    config.train.checkpoint_every = 200
    config.train.num_pictures = 2
    return config
