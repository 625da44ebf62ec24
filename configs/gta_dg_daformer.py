"""Domain generalisation (paper 4.2): T2S-DA w/ DAFormer trained on GTA5 alone (48.6 mIoU19).

No target data, and the loss is L_src + lambda*L_pull. The paper's pseudo-target comes from the
translation model of Kundu et al. (2021), which has no public JAX port; [our choice] it is a
style augmentation of the source (colour jitter + blur) here: `pull.translation` switches it.
Evaluated on Cityscapes val, which is never seen in training.
"""

from t2s_jax.config import default_config


def get_config():
    config = default_config()
    config.method = "dg"
    config.model.pretrained = "weights/mit_b5.pth"
    config.data.target = ""
    config.pull.translation = "color_jitter"
    config.pull.domain_equalised_negatives = False  # only source negatives exist
    return config
