"""SYNTHIA -> Cityscapes on the DAFormer host (MiT-B5, 512^2 crops); T2S-DA w/ DAFormer by default.

`--config=configs/synthia_cs_daformer.py:<method>` trains another preset of t2s_jax/methods.py
instead. TARGETS states the number each targets (Cityscapes val mIoU16 / mIoU13, both in every
evaluation; docs/method.md §9); "—" where none is published on this host.
SYNTHIA-RAND-CITYSCAPES images stay at 1280x760.
"""

from t2s_jax import benchmarks

TARGETS = {
    "t2s": "62.8 / 69.4",  # T2S-DA w/ DAFormer
    "daformer": "60.9 / 67.4",  # DAFormer
    "source_only": "—",
    "dg": "—",  # domain generalisation from SYNTHIA alone
    "mic": "— (MIC(HRDA): 67.3 / 74.0)",
    "t2s_mic": "— (68.4 / 74.8 on MIC(HRDA))",
    # MaskTwins' released setting, on HRDA (1024^2 crops, 64-px blocks); here at 512^2, 32-px
    # blocks: complementary masks of ratio 0.5, CE 0.5 per view, consistency MSE 0.01.
    "masktwins": "— (— / 76.7 on HRDA)",
}


def get_config(method: str = "t2s"):
    return benchmarks.daformer_host("synthia", method, TARGETS)
