"""DAFormer (MiT-B5), GTA5 -> Cityscapes, without the pulling loss (paper: 68.3 mIoU19)."""

from t2s_jax import methods
from t2s_jax.config import default_config


def get_config():
    config = methods.with_method(default_config(), "daformer")
    config.model.pretrained = "weights/mit_b5.pth"
    return config
