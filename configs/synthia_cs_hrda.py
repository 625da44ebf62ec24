"""SYNTHIA -> Cityscapes on the HRDA host (MiT-B5, 1024^2 crops of 2560x1520 / 2048x1024 images,
512^2 detail crops); T2S-DA w/ HRDA by default.

`--config=configs/synthia_cs_hrda.py:<method>`: `hrda`, `mic`, `t2s`, `t2s_mic` or `masktwins`
(its released config: 64-px complementary masks of ratio 0.5 on the first target image).
TARGETS states the number each targets (Cityscapes val mIoU16 / mIoU13, both in every evaluation).
"""

from t2s_jax import benchmarks

TARGETS = {
    "t2s": "67.5 / 73.8",  # T2S-DA w/ HRDA
    "hrda": "65.8 / 72.4",  # HRDA
    "mic": "67.3 / 74.0",  # MIC(HRDA)
    "t2s_mic": "68.4 / 74.8",  # T2S-DA w/ MIC
    "masktwins": "— / 76.7",  # MaskTwins
}


def get_config(method: str = "t2s"):
    return benchmarks.hrda_host("synthia", method, TARGETS)
