"""Import of published PyTorch weights: MiT ImageNet `.pth` (SegFormer/mmseg layout), ResNet
ImageNet `.pth` (mmcv ResNetV1c or torchvision layout), DINOv2 (torch.hub or Hugging Face
`Dinov2Model` layout) and
Hugging Face SegFormer checkpoints (`config.json` + `model.safetensors`); and of the Orbax
directories `python -m t2s_jax.models.convert` writes from them (`state/` + `model_config.json`).

  reading     files and directories -> tensors (safetensors, `torch.load(weights_only=True)`)
  layouts     the canonical key layout every source is brought into, and the keys of each
              model variable
  loading     the generic loader: canonical tensors into an NNX module, every mismatch reported
  resnet      ResNet state dicts into a ResNet encoder (the stem is checked first)
  dinov2      DINOv2 state dicts (hub or Hugging Face names) into a ViT encoder
  hf          Hugging Face SegFormer directories as complete models
  converted   directories written by `python -m t2s_jax.models.convert`
  pretrained  the entry points, and `problem(path)`: the check a command runs before any work
"""

from t2s_jax.models.weights.converted import is_converted_dir, read_converted
from t2s_jax.models.weights.dinov2 import load_dinov2_pretrained
from t2s_jax.models.weights.errors import WeightsError
from t2s_jax.models.weights.hf import from_hf_pretrained, load_hf_pretrained, model_config_from_hf
from t2s_jax.models.weights.loading import LoadSummary, count_parameters
from t2s_jax.models.weights.pretrained import load_pretrained_encoder, load_segmentor, maybe_load_pretrained, problem
from t2s_jax.models.weights.reading import load_mit_pth, read_checkpoint
from t2s_jax.models.weights.resnet import load_resnet_pretrained

__all__ = [
    "LoadSummary",
    "WeightsError",
    "count_parameters",
    "from_hf_pretrained",
    "is_converted_dir",
    "load_dinov2_pretrained",
    "load_hf_pretrained",
    "load_mit_pth",
    "load_pretrained_encoder",
    "load_resnet_pretrained",
    "load_segmentor",
    "maybe_load_pretrained",
    "model_config_from_hf",
    "problem",
    "read_checkpoint",
    "read_converted",
]
