"""The ViT demo: VFM-UDA and T2S-DA w/ VFM-UDA on the synthetic domain pair, on a CPU.

`python -m t2s_jax.main --config=configs/synthetic_demo_vfm.py --workdir=runs/demo_vfm` trains
`vfm_uda` and `t2s_vfm_uda` one after the other, as configs/synthetic_demo.py trains its
methods: the same data, schedule and learning rates, with a tiny DINOv2-style ViT from random
init (4 blocks of width 64, patch 8: the 128^2 crops resized to 136, 17x17 tokens; patch 14
gives 10x10 tokens, too coarse for 128^2 crops) and VFM-UDA's recipe
(the upscaling head, the flip-averaged teacher, token masking, no feature distance), evaluated
with 128^2 windows at stride 64.
"""

from t2s_jax import benchmarks
from t2s_jax.config import vit_config


def get_config():
    config = benchmarks.synthetic_demo()
    config.compare_methods = ("vfm_uda", "t2s_vfm_uda")
    # Random init: the position grid is the resized crop's, so nothing is interpolated.
    config.model.encoder = vit_config("s", embed_dim=64, depth=4, num_heads=2, patch_size=8, pretrain_size=136)
    benchmarks.apply_vfm_recipe(config)
    config.eval.slide_crop_hw = (128, 128)
    config.eval.slide_stride_hw = (64, 64)
    return config
