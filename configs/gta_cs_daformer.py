"""GTA5 -> Cityscapes on the DAFormer host (MiT-B5, 512^2 crops); T2S-DA w/ DAFormer by default,
the paper's main setting.

`--config=configs/gta_cs_daformer.py:<method>` trains another preset of t2s_jax/methods.py
instead, e.g. `:daformer` (the baseline) or `:mic`. TARGETS states the number each targets
(Cityscapes val mIoU19, docs/method.md §9); "—" where none is published on this host.
Needs: `python -m data_pipelines.prepare --dataset=gta5 ...` and `--dataset=cityscapes ...`,
and the MiT-B5 ImageNet weights at weights/mit_b5.pth (SegFormer release, mmseg key layout).
"""

from t2s_jax import benchmarks

TARGETS = {
    "t2s": "70.0",  # T2S-DA w/ DAFormer
    "daformer": "68.3",  # DAFormer
    "source_only": "46.1",  # DAFormer source-only (the paper's domain-generalisation table)
    "dg": "48.6",  # as configs/gta_dg_daformer.py: no target data
    "mic": "70.6",  # MIC(DAFormer), the MIC paper as quoted in lhoyer/MIC#71
    "t2s_mic": "— (76.7 on MIC(HRDA))",  # the paper's headline needs the HRDA host
    "masktwins": "— (MaskTwins publishes SYNTHIA on HRDA only)",
}


def get_config(method: str = "t2s"):
    return benchmarks.daformer_host("gta5", method, TARGETS)
