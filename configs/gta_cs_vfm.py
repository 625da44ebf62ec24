"""GTA5 -> Cityscapes on the DINOv2 ViT host (VFM-UDA: ViT/14 + its light head, 1024^2 crops
resized to 1120, 8 + 8 images per step); T2S-DA on it by default.

`--config=configs/gta_cs_vfm.py:<method>[,<variant>]`: `vfm_uda` (VFM-UDA), `vfm_uda_fd`
(VFM-UDA + VFM-UDA++'s feature distillation) or `t2s` (VFM-UDA + the T2S-DA pulling loss on
the head's last feature map), on ViT-B (`b`, the default) or ViT-L (`l`), e.g. `--config=configs/gta_cs_vfm.py:vfm_uda,l`. TARGETS states the number each targets
(Cityscapes val mIoU19). VFM-UDA++'s 79.8 needs its ViT-Adapter, which this host does not
build. Needs the prepared gta5 and cityscapes datasets and torch.hub's DINOv2 weights at
weights/dinov2_vit{b,l}14_pretrain.pth (docs/weights.md).
"""

from t2s_jax import benchmarks

TARGETS = {
    "t2s": "— (T2S-DA on a DINOv2 encoder: no published number)",
    # VFM-UDA + VFM-UDA++'s feature distillation, to the frozen initial DINOv2 (VFM-UDA++ distils
    # to a DINOv2-L/14 with registers and adds its ViT-Adapter: 79.8 / 69.7 mIoU16)
    "vfm_uda_fd": "—",
    "vfm_uda": "77.1 (ViT-B) / 78.4 (ViT-L)",  # VFM-UDA's released re-trained models
}


def get_config(argument: str = "t2s"):
    method, _, variant = argument.partition(",")
    return benchmarks.vfm_host("gta5", method, TARGETS, variant or "b")
