"""T2S-DA w/ DAFormer (MiT-B5), GTA5 -> Cityscapes: the paper's main setting (70.0 mIoU19).

Every value is method.md's; the defaults of t2s_jax/config.py are this benchmark.
Needs: `python -m data_pipelines.prepare --dataset=gta5 ...` and `--dataset=cityscapes ...`,
and the MiT-B5 ImageNet weights at weights/mit_b5.pth (SegFormer release, mmseg key layout).
"""

from t2s_jax import methods
from t2s_jax.config import default_config


def get_config():
    config = methods.with_method(default_config(), "t2s")
    config.model.pretrained = "weights/mit_b5.pth"
    return config
