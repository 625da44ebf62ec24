"""DAFormer (MiT-B5), GTA5 -> Cityscapes, without the pulling loss (paper: 68.3 mIoU19)."""

from t2s_jax.config import default_config


def get_config():
    config = default_config()
    config.method = "daformer"
    config.model.projector.enabled = False
    config.model.pretrained = "weights/mit_b5.pth"
    return config
