"""Domain generalisation (paper 4.2) on the DAFormer host (MiT-B5): trained on GTA5 alone,
evaluated on Cityscapes val, never seen in training; T2S-DA (`dg`) by default.

`--config=configs/gta_dg_daformer.py:source_only` trains the source-only baseline. TARGETS
states the number each targets (mIoU19, docs/method.md §9). No target data: the loss is
L_src + lambda * L_pull, with source prototypes and source negatives only (no domain-equalised
negatives, no dynamic re-weighting: both need target pixels; `methods.with_method` switches
them off). The paper's pseudo-target comes from the translation model of Kundu et al. (2021),
which has no public JAX port; [our choice] it is a colour jitter of the source here:
`pull.translation` switches it.
"""

from t2s_jax import benchmarks

TARGETS = {
    "dg": "48.6",  # T2S-DA w/ DAFormer
    "source_only": "46.1",  # DAFormer source-only
}


def get_config(method: str = "dg"):
    return benchmarks.daformer_host("gta5", method, TARGETS)
