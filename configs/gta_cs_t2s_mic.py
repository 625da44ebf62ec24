"""T2S-DA w/ MIC on the DAFormer host (MiT-B5, 512^2 crops), GTA5 -> Cityscapes.

The pulling term of configs/gta_cs_daformer.py and the masked-consistency term of
configs/gta_cs_mic.py in one step. The paper's T2S-DA w/ MIC, 76.7 mIoU19 (its headline), is on
MIC(HRDA), 1024^2 crops, which needs the HRDA host; on the DAFormer host the reference is
MIC(DAFormer), 70.6, and T2S-DA's gain over its hosts (+1.7 on DAFormer, +0.8 on MIC(HRDA)).
"""

from t2s_jax import methods
from t2s_jax.config import default_config


def get_config():
    config = methods.with_method(default_config(), "t2s_mic")
    config.model.pretrained = "weights/mit_b5.pth"
    return config
