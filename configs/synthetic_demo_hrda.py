"""The HRDA demo: HRDA and MIC(HRDA) on the synthetic domain pair, on a CPU.

`python -m t2s_jax.main --config=configs/synthetic_demo_hrda.py --workdir=runs/demo_hrda` trains
`daformer` (the DAFormer strategies: on the HRDA host, HRDA itself) and `mic` one after the
other, as configs/synthetic_demo.py trains its methods: the same tiny MiT and schedule, with
HRDA's geometry scaled from 1024^2 crops of 2048x1024 images to 128^2 crops of 256x128 ones
(64^2 detail crops, context at 0.5, the 64/32 teacher slide, the 128/64 evaluation slide,
pseudo-label margins and MIC's mask blocks / 8).
"""

from t2s_jax import benchmarks


def get_config():
    config = benchmarks.synthetic_demo()
    config.compare_methods = ("daformer", "mic")
    hrda = config.model.hrda
    hrda.enabled = True
    hrda.detail_crop_hw = (64, 64)
    hrda.detail_slide_stride_hw = (32, 32)
    config.data.pseudo_margins = (4, 30, 4, 4)  # HRDA's (30, 240, 30, 30) on 1024x2048
    config.eval.mode = "slide"
    config.eval.slide_crop_hw = (128, 128)
    config.eval.slide_stride_hw = (64, 64)
    config.mic.block_size = 8  # MIC's 64 px at 1024^2 crops
    return config
