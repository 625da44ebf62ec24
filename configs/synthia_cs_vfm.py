"""SYNTHIA -> Cityscapes on the DINOv2 ViT host (VFM-UDA: ViT/14 + its light head, 1024^2 crops
resized to 1120); T2S-DA on it by default.

`--config=configs/synthia_cs_vfm.py:<method>[,<variant>]`: `vfm_uda`, `vfm_uda_fd` or `t2s`, on
ViT-B (`b`) or ViT-L (`l`), as configs/gta_cs_vfm.py. VFM-UDA publishes GTA5 -> Cityscapes only; VFM-UDA++'s
69.7 mIoU16 (ViT-B) needs its ViT-Adapter, which this host does not build. Needs the prepared
synthia and cityscapes datasets and torch.hub's DINOv2 weights (docs/weights.md).
"""

from t2s_jax import benchmarks

TARGETS = {
    "t2s": "— (T2S-DA on a DINOv2 encoder: no published number)",
    # VFM-UDA + VFM-UDA++'s feature distillation, to the frozen initial DINOv2 (VFM-UDA++ distils
    # to a DINOv2-L/14 with registers and adds its ViT-Adapter: 79.8 / 69.7 mIoU16)
    "vfm_uda_fd": "—",
    "vfm_uda": "— (VFM-UDA publishes GTA5 only)",
}


def get_config(argument: str = "t2s"):
    method, _, variant = argument.partition(",")
    return benchmarks.vfm_host("synthia", method, TARGETS, variant or "b")
