"""MIC on the DAFormer host (MiT-B5, 512^2 crops), GTA5 -> Cityscapes.

Targets MIC(DAFormer)'s 70.6 mIoU19 (the MIC paper's DAFormer-host number, as quoted in
lhoyer/MIC#71; the MIC README reports MIC(HRDA), 75.9, which needs the HRDA host). Masking as
MIC's experiment 81: the colour-augmented target, 32-px blocks at 512^2 crops (half of HRDA's
64 at 1024^2), ratio 0.7, lambda 1, the host's EMA teacher and pseudo-labels. Method details:
docs/method.md ("MIC").
"""

from t2s_jax import methods
from t2s_jax.config import default_config


def get_config():
    config = methods.with_method(default_config(), "mic")
    config.model.pretrained = "weights/mit_b5.pth"
    return config
