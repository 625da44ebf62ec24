"""The PyTorch reference of `python -m t2s_jax.bench --torch_reference`: the same model, trained as mmseg does.

The encoder is Hugging Face's `SegformerModel` (MiT) with the config's widths, depths, heads
and reduction ratios; the head is DAFormer's (written here, as `models/heads.py` builds it:
per-stage Linear, bilinear resize to stride 4, depthwise-separable ASPP, 3x3 fusion, channel
dropout, 1x1 classifier) or, for `model.head='segformer'`, Hugging Face's
`SegformerDecodeHead`. Random initialisation: the timings do not depend on the weights.

Two rows per dtype, on one device (CUDA when PyTorch sees one, else the CPU), on the
source images and labels of the JAX rows' synthetic batch (`config.data.batch_size` crops):

* train step: forward, bilinear upsample of the stride-4 logits to the crop, cross-entropy
  with ignore 255 averaged over all pixels (mmseg's), `zero_grad`, backward and AdamW with
  mmseg's parameter groups for DAFormer (head at `optim.head_lr_multiplier` x the rate,
  no weight decay on norms), i.e. one source-only step;
* teacher forward: no gradients, eval mode, upsample, softmax and max (the pseudo-labels
  an EMA teacher computes in a DAFormer step).

float32 runs eagerly in float32 (cuDNN autotuning on, as mmseg's configs set); bfloat16
runs under `torch.autocast` with float32 weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import SegformerConfig, SegformerModel
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

from t2s_jax.classes import IGNORE_INDEX
from t2s_jax.uda.normalize import IMAGENET_MEAN, IMAGENET_STD

PASSES = ("train step", "teacher forward")
_AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class TorchRow:
    pass_name: str  # one of PASSES
    dtype: str
    device: str
    batch: int
    crop_hw: tuple[int, int]
    first_step_s: float  # the first call, cuDNN autotuning included
    step_ms: float  # median
    step_ms_spread: tuple[float, float]  # 10th and 90th percentile
    images_per_s: float
    peak_memory_bytes: int | None  # CUDA's max_memory_allocated during the row; None on the CPU
    final_value: float  # the last loss (train step) or mean confidence (teacher forward)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1):
    """mmcv's ConvModule: conv without bias, BatchNorm, ReLU."""
    padding = dilation * (kernel_size // 2)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DAFormerHead(nn.Module):
    """DAFormer's head (`fusion_cfg=dict(type='aspp', sep=True)`) of `config.model`, over NCHW stage outputs."""

    def __init__(self, model_config: ml_collections.ConfigDict):
        super().__init__()
        in_channels, channels = model_config.encoder.embed_dims, model_config.head_channels
        aspp_dilations = model_config.aspp_dilations
        concat = channels * len(in_channels)
        self.embed = nn.ModuleList(nn.Linear(width, channels) for width in in_channels)
        self.aspp_1x1 = _conv_bn_relu(concat, channels, 1)
        self.aspp_separable = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(concat, concat, 3, dilation, groups=concat), _conv_bn_relu(concat, channels, 1))
            for dilation in aspp_dilations
        )
        self.bottleneck = _conv_bn_relu(channels * (1 + len(aspp_dilations)), channels, 3)
        self.dropout = nn.Dropout2d(model_config.dropout_rate)
        self.classifier = nn.Conv2d(channels, model_config.num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        embedded = []
        for feature, embed in zip(features, self.embed, strict=True):
            batch, _, height, width = feature.shape
            tokens = embed(feature.flatten(2).transpose(1, 2))  # (B, h*w, channels)
            grid = tokens.transpose(1, 2).reshape(batch, -1, height, width)
            embedded.append(F.interpolate(grid, size=size, mode="bilinear", align_corners=False))
        x = torch.cat(embedded, dim=1)
        branches = [self.aspp_1x1(x)] + [branch(x) for branch in self.aspp_separable]
        return self.classifier(self.dropout(self.bottleneck(torch.cat(branches, dim=1))))


class Segmentor(nn.Module):
    """MiT (Hugging Face `SegformerModel`) + decode head: images (B, 3, H, W) -> stride-4 logits."""

    def __init__(self, model_config: ml_collections.ConfigDict):
        super().__init__()
        encoder = model_config.encoder
        hf_config = SegformerConfig(
            hidden_sizes=list(encoder.embed_dims),
            depths=list(encoder.depths),
            num_attention_heads=list(encoder.num_heads),
            sr_ratios=list(encoder.sr_ratios),
            mlp_ratios=[encoder.mlp_ratio] * len(encoder.depths),
            drop_path_rate=encoder.drop_path_rate,
            layer_norm_eps=encoder.block_norm_eps,
            decoder_hidden_size=model_config.head_channels,
            classifier_dropout_prob=model_config.dropout_rate,
            num_labels=model_config.num_classes,
        )
        self.encoder = SegformerModel(hf_config)
        if model_config.head == "daformer":
            self.decode_head = DAFormerHead(model_config)
        elif model_config.head == "segformer":
            self.decode_head = SegformerDecodeHead(hf_config)
        else:
            raise ValueError(f"config.model.head={model_config.head!r}: expected 'daformer' or 'segformer'")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images, output_hidden_states=True).hidden_states
        return self.decode_head(list(features))


def mmseg_adamw(model: nn.Module, optim_config: ml_collections.ConfigDict) -> torch.optim.AdamW:
    """AdamW with DAFormer's `paramwise_cfg`: 'head' parameters at the head multiplier, 'norm' ones undecayed."""
    head, norms, rest = [], [], []
    for name, parameter in model.named_parameters():
        (head if "head" in name else norms if "norm" in name else rest).append(parameter)
    rate, decay = optim_config.learning_rate, optim_config.weight_decay
    groups = [
        {"params": rest, "lr": rate, "weight_decay": decay},
        {"params": norms, "lr": rate, "weight_decay": 0.0},
        {"params": head, "lr": rate * optim_config.head_lr_multiplier, "weight_decay": decay},
    ]
    return torch.optim.AdamW(groups, betas=(optim_config.b1, optim_config.b2))


def _inputs(host_batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised NCHW float32 source images and int64 labels of the JAX rows' batch."""
    images = (host_batch["source_image"].astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    return images, torch.from_numpy(host_batch["source_label"].astype(np.int64)).to(device)


def _time_calls(fn: Callable[[], torch.Tensor], sync: Callable[[], None], *, steps: int, warmup: int):
    """(seconds of the first call, seconds of each timed call, the last call's value)."""
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        value = fn()
        sync()
        times.append(time.perf_counter() - start)
    return first_s, times, float(value)


def benchmark(
    config: ml_collections.ConfigDict,
    host_batch: dict[str, np.ndarray],
    dtypes: Sequence[str],
    *,
    steps: int,
    warmup: int,
) -> list[TorchRow]:
    """The train step and the teacher forward of `config.model` in PyTorch, per dtype."""
    for dtype in dtypes:
        if dtype not in _AUTOCAST_DTYPES:
            raise ValueError(f"--dtypes: no PyTorch reference for {dtype!r}; expected some of {sorted(_AUTOCAST_DTYPES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(config.seed)
    images, labels = _inputs(host_batch, device)
    crop_hw = tuple(images.shape[2:])
    model = Segmentor(config.model).to(device)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    rows = []
    for dtype in dtypes:
        autocast_dtype = _AUTOCAST_DTYPES[dtype]

        def precision():
            if autocast_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type=device.type, dtype=autocast_dtype)

        optimizer = mmseg_adamw(model, config.optim)

        def train_step() -> torch.Tensor:
            with precision():
                logits = F.interpolate(model(images), size=crop_hw, mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none").mean()
            optimizer.zero_grad(set_to_none=True)  # mmcv's OptimizerHook order
            loss.backward()
            optimizer.step()
            return loss.detach()

        def teacher_forward() -> torch.Tensor:
            with torch.no_grad(), precision():
                logits = F.interpolate(model(images), size=crop_hw, mode="bilinear", align_corners=False)
                confidence, _ = torch.softmax(logits.float(), dim=1).max(dim=1)
            return confidence.mean()

        for pass_name, fn, train_mode in zip(PASSES, (train_step, teacher_forward), (True, False), strict=True):
            model.train(train_mode)
            if on_cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            first_s, times, value = _time_calls(fn, sync, steps=steps, warmup=warmup)
            step_s = statistics.median(times)
            rows.append(
                TorchRow(
                    pass_name=pass_name,
                    dtype=dtype,
                    device=torch.cuda.get_device_name(device) if on_cuda else "cpu",
                    batch=images.shape[0],
                    crop_hw=crop_hw,
                    first_step_s=first_s,
                    step_ms=1000 * step_s,
                    step_ms_spread=tuple(1000 * float(q) for q in np.percentile(times, [10, 90])),
                    images_per_s=images.shape[0] / step_s,
                    peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if on_cuda else None,
                    final_value=value,
                )
            )
    del model, optimizer
    if on_cuda:
        torch.cuda.empty_cache()  # the accelerator's memory back for the JAX rows
    return rows


def format_table(rows: Sequence[TorchRow]) -> str:
    """The rows as one markdown table."""
    lines = [
        "| PyTorch pass | dtype | device | batch | first step (s) | step (ms, median) | images/s | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        memory = "–" if row.peak_memory_bytes is None else f"{row.peak_memory_bytes / 2**30:.2f} GiB"
        lines.append(
            f"| {row.pass_name} | {row.dtype} | {row.device} | {row.batch} | {row.first_step_s:.1f} "
            f"| {row.step_ms:.1f} | {row.images_per_s:.2f} | {memory} |"
        )
    return "\n".join(lines)
