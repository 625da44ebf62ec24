"""Source-only MiT-B5 + DAFormer head trained on GTA5, evaluated on Cityscapes.

Same recipe as DAFormer (RCS, crops, AdamW, schedule) without any target term.
"""

from t2s_jax.config import default_config


def get_config():
    config = default_config()
    config.method = "source_only"
    config.model.projector.enabled = False
    config.model.pretrained = "weights/mit_b5.pth"
    config.data.target = ""  # no target images are read
    return config
