"""GTA5 -> Cityscapes on DeepLab-V2 (ResNetV1c-101, the `dlv2red` head, 512^2 crops), the CNN
host of half the T2S-DA paper's tables; T2S-DA (InfoNCE) by default.

`--config=configs/gta_cs_deeplab.py:<method>`: `source_only`, `daformer` (DACS with DAFormer's
strategies: the paper's DeepLab-V2 baseline), `t2s` (+ the InfoNCE pulling loss), `t2s_mse`
(+ the MSE pulling loss) or `mic`. TARGETS states the number each targets (Cityscapes val
mIoU19; "—" where none is published on this host). Needs the prepared gta5 and cityscapes
datasets and mmcv's ImageNet ResNetV1c-101 weights at weights/resnet101_v1c.pth (docs/weights.md).
"""

from t2s_jax import benchmarks

TARGETS = {
    "t2s": "60.4",  # T2S-DA (InfoNCE), the paper's Table 4
    "t2s_mse": "58.6",  # T2S-DA with the MSE pulling loss, Table 4
    "daformer": "56.3",  # the paper's DeepLab-V2 baseline (DACS + DAFormer's strategies)
    "source_only": "—",
    "mic": "—",
}


def get_config(method: str = "t2s"):
    return benchmarks.deeplab_host("gta5", method, TARGETS)
