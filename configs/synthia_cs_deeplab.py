"""SYNTHIA -> Cityscapes on DeepLab-V2 (ResNetV1c-101, the `dlv2red` head, 512^2 crops); T2S-DA
(InfoNCE) by default.

`--config=configs/synthia_cs_deeplab.py:<method>`: the methods of configs/gta_cs_deeplab.py.
TARGETS states the number each targets (Cityscapes val mIoU16 / mIoU13, both in every
evaluation; "—" where none is published on this host).
"""

from t2s_jax import benchmarks

TARGETS = {
    "t2s": "57.6 / 65.4",  # T2S-DA (InfoNCE), the paper's Table 2
    "t2s_mse": "—",
    "daformer": "—",
    "source_only": "—",
    "mic": "—",
}


def get_config(method: str = "t2s"):
    return benchmarks.deeplab_host("synthia", method, TARGETS)
