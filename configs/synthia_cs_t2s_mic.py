"""T2S-DA w/ MIC on the DAFormer host (MiT-B5, 512^2 crops), SYNTHIA -> Cityscapes.

The paper's T2S-DA w/ MIC on MIC(HRDA): 68.4 mIoU16 / 74.8 mIoU13 (MIC(HRDA): 67.3 / 74.0);
no DAFormer-host number is published.
"""

from t2s_jax import methods
from t2s_jax.config import default_config


def get_config():
    config = methods.with_method(default_config(), "t2s_mic")
    config.model.pretrained = "weights/mit_b5.pth"
    config.data.source = "synthia"
    config.data.source_resize_hw = (760, 1280)  # SYNTHIA keeps its size
    return config
