"""GTA5 -> Cityscapes on the HRDA host (MiT-B5, 1024^2 crops of 2560x1407 / 2048x1024 images,
512^2 detail crops); T2S-DA w/ HRDA by default.

`--config=configs/gta_cs_hrda.py:<method>`: `hrda` (the DAFormer strategies on HRDA), `mic`,
`t2s`, `t2s_mic` (the paper's best) or `masktwins`. TARGETS states the number each targets
(Cityscapes val mIoU19). Needs the prepared gta5 and cityscapes datasets and the MiT-B5 ImageNet
weights at weights/mit_b5.pth, as configs/gta_cs_daformer.py.
"""

from t2s_jax import benchmarks

TARGETS = {
    "t2s": "75.1",  # T2S-DA w/ HRDA
    "hrda": "73.8",  # HRDA
    "mic": "75.9",  # MIC(HRDA)
    "t2s_mic": "76.7",  # T2S-DA w/ MIC
    "masktwins": "— (MaskTwins publishes SYNTHIA only)",
}


def get_config(method: str = "t2s"):
    return benchmarks.hrda_host("gta5", method, TARGETS)
