"""Domain generalisation (paper 4.2): T2S-DA w/ DAFormer trained on GTA5 alone (48.6 mIoU19;
DAFormer source-only 46.1).

No target data: the loss is L_src + lambda * L_pull, with source prototypes and source
negatives only (no domain-equalised negatives, no dynamic re-weighting: both need target
pixels; `methods.with_method` switches them off). The paper's pseudo-target comes from the
translation model of Kundu et al. (2021), which has no public JAX port; [our choice] it is a
colour jitter of the source here: `pull.translation` switches it. Evaluated on Cityscapes val,
never seen in training.
"""

from t2s_jax import methods
from t2s_jax.config import default_config


def get_config():
    config = methods.with_method(default_config(), "dg")
    config.model.pretrained = "weights/mit_b5.pth"
    return config
