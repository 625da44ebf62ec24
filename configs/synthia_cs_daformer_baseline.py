"""DAFormer (MiT-B5), SYNTHIA -> Cityscapes (paper: 60.9 mIoU16 / 67.4 mIoU13).

SYNTHIA-RAND-CITYSCAPES images stay at 1280x760; mIoU16 and mIoU13 are in every evaluation.
"""

from t2s_jax import methods
from t2s_jax.config import default_config


def get_config():
    config = methods.with_method(default_config(), "daformer")
    config.model.pretrained = "weights/mit_b5.pth"
    config.data.source = "synthia"
    config.data.source_resize_hw = (760, 1280)  # SYNTHIA keeps its size
    return config
