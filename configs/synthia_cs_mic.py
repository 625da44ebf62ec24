"""MIC on the DAFormer host (MiT-B5, 512^2 crops), SYNTHIA -> Cityscapes (mIoU16 / mIoU13).

No DAFormer-host number is published for SYNTHIA; MIC(HRDA) reports 67.3 mIoU16 / 74.0 mIoU13.
Masking as in configs/gta_cs_mic.py. SYNTHIA-RAND-CITYSCAPES images keep their 1280x760.
"""

from t2s_jax import methods
from t2s_jax.config import default_config


def get_config():
    config = methods.with_method(default_config(), "mic")
    config.model.pretrained = "weights/mit_b5.pth"
    config.data.source = "synthia"
    config.data.source_resize_hw = (760, 1280)  # SYNTHIA keeps its size
    return config
