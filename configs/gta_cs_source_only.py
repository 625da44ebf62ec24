"""Source-only MiT-B5 + DAFormer head trained on GTA5, evaluated on Cityscapes.

Same recipe as DAFormer (RCS, crops, AdamW, schedule) without any target term; no target
images are read (`methods.with_method` clears `data.target`).
"""

from t2s_jax import methods
from t2s_jax.config import default_config


def get_config():
    config = methods.with_method(default_config(), "source_only")
    config.model.pretrained = "weights/mit_b5.pth"
    return config
