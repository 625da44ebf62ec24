"""Every (config, method) of configs/ trains and evaluates through what `python -m t2s_jax.main`
runs (`main.run`), on 2 of the 8 fake devices (DeepLab-V2 and the ViT host: GTA5 on 4, SYNTHIA
on 1), and each method's run resumes from its checkpoint: the code path a user runs, shrunk by
overrides (tiny MiT, ResNet or ViT, 64x64 crops, datasets in the published layouts, pretrained
weights in the mmseg / mmcv / torch.hub key layouts)."""

import json
import os
import shutil
import sys

import pytest
import torch
from transformers import SegformerConfig, SegformerModel

from data_pipelines import prepare
from t2s_jax import checkpointing, main, methods
from t2s_jax.training import eval_mode

sys.path.insert(0, os.path.dirname(__file__))
import dataset_trees  # noqa: E402
import test_resnet  # noqa: E402
import test_vit  # noqa: E402
import test_weights  # noqa: E402
import tiny  # noqa: E402
from test_config_schema import benchmark_pairs, load  # noqa: E402

PAIRS = benchmark_pairs()
# Pairs that are the same run as another (the same config): trained once.
SAME_AS = {
    ("gta_dg_daformer.py", "dg"): ("gta_cs_daformer.py", "dg"),
    ("gta_dg_daformer.py", "source_only"): ("gta_cs_daformer.py", "source_only"),
}

# What a resume restores is the train state (its terms' states: MIC's) and the data iterators'
# positions: t2s_mic holds every term with a state and both domains' iterators, dg the source's
# alone. The other methods' states are subsets of these, and the other hosts' (HRDA's attention
# head, DeepLab-V2's and the ViT's encoders) differ only in their variables, which the same
# checkpoint code saves and restores as any others.
RESUMES = {("gta_cs_daformer.py", "t2s_mic"), ("gta_cs_daformer.py", "dg")}

_ENCODER = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
_RESNET = dict(depths=(1, 1, 1, 1), base_widths=(8, 16, 32, 64), stem_channels=16)
# A 2-block ViT/14 pre-trained at 56^2 (4x4 positions): 64^2 crops resize to 70, 5x5 tokens.
_VIT = test_vit.TINY_SETTINGS


def _tiny_overrides(data_dir: str, pretrained: str) -> dict:
    return {
        **{f"model.encoder.{key}": value for key, value in _ENCODER.items()},
        "model.head_channels": 32, "model.projector.hidden_channels": 32, "model.projector.dim": 32,
        "model.pretrained": pretrained,
        "num_devices": 2,
        "data.data_dir": data_dir, "data.num_workers": 0, "data.batch_size": 2,
        "data.source_resize_hw": (64, 128), "data.target_resize_hw": (64, 128), "data.eval_resize_hw": (64, 128),
        "data.crop_hw": (64, 64), "data.max_eval_examples": 2,
        "data.rcs.min_pixels": 50, "data.rcs.min_crop_pixels": 20,
        "uda.pseudo_ignore_top": 4, "uda.pseudo_ignore_bottom": 8,
        "pull.num_queries": 8, "pull.num_negatives": 16,
        "mic.block_size": 16, "masktwins.block_size": 16,
        "optim.warmup_steps": 1,
        "train.num_steps": 2, "train.log_every": 1, "train.eval_every": 2, "train.checkpoint_every": 1,
        "train.num_pictures": 1,
    }  # fmt: skip


# The HRDA configs' geometry divided by 16: 64^2 crops of 64x128 images, 32^2 detail crops with
# the 16-px teacher slide, the 64/32 evaluation slide, Cityscapes margins (30, 240, 30, 30) / 16.
_HRDA_OVERRIDES = {
    "model.hrda.detail_crop_hw": (32, 32), "model.hrda.detail_slide_stride_hw": (16, 16),
    "eval.slide_crop_hw": (64, 64), "eval.slide_stride_hw": (32, 32),
    "data.pseudo_margins": (2, 15, 2, 2), "uda.pseudo_ignore_top": 0, "uda.pseudo_ignore_bottom": 0,
}  # fmt: skip


# The ViT configs' geometry divided by 16: the 64/32 evaluation slide, margins (30, 256, 61, 61) / 16.
_VFM_OVERRIDES = {
    "eval.slide_crop_hw": (64, 64), "eval.slide_stride_hw": (32, 32), "data.pseudo_margins": (2, 16, 4, 4),
    "uda.pseudo_ignore_top": 0, "uda.pseudo_ignore_bottom": 0,
}  # fmt: skip


def _encoder_overrides(overrides: dict, encoder: dict, pretrained: str, on_4: bool) -> dict:
    """`overrides` for another tiny encoder: each method on 4 devices (GTA5) or on 1 (SYNTHIA)."""
    overrides = {key: value for key, value in overrides.items() if not key.startswith("model.encoder.")}
    overrides.update({f"model.encoder.{key}": value for key, value in encoder.items()})
    overrides.update({"model.pretrained": pretrained, "num_devices": 4 if on_4 else 1,
                      "data.batch_size": 4 if on_4 else 2})  # fmt: skip
    return overrides


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Tiny GTA5, SYNTHIA and Cityscapes trees, prepared; MiT weights of the tiny encoder as a `.pth`."""
    root = tmp_path_factory.mktemp("configs")
    dataset_trees.write_gta5(f"{root}/gta5")
    dataset_trees.write_synthia(f"{root}/synthia")
    dataset_trees.write_cityscapes(f"{root}/cityscapes")
    for name in ("gta5", "synthia", "cityscapes"):
        prepare.prepare(name, f"{root}/tfds", f"{root}/{name}")
    hf_config = SegformerConfig(
        hidden_sizes=list(_ENCODER["embed_dims"]), depths=list(_ENCODER["depths"]),
        num_attention_heads=list(_ENCODER["num_heads"]), sr_ratios=[8, 4, 2, 1],
    )  # fmt: skip
    torch.save(test_weights.mmseg_layout(test_weights.save_hf(SegformerModel(hf_config), root / "hf")), root / "mit.pth")
    torch.manual_seed(0)
    resnet = test_resnet.TorchResNet(
        _RESNET["depths"], _RESNET["base_widths"], stem_channels=_RESNET["stem_channels"], deep_stem=True
    )  # fmt: skip
    test_resnet.save_state_dict(resnet, root / "resnet_v1c.pth")  # mmcv's ResNetV1c layout
    test_vit.save_hub_checkpoint(root / "dinov2.pth", directory=root / "dinov2_hf")  # torch.hub's layout
    return root


def _demo_superset(config) -> str:
    """The demo's method whose terms hold every other compared method's: the one a demo test
    trains (the comparison itself, stopped, resumed and rerun, is tests/test_faults.py's)."""
    terms = {name: set(methods.term_names(methods.with_method(config, name))) for name in config.compare_methods}
    (superset,) = [name for name in terms if all(other <= terms[name] for other in terms.values())]
    return superset


def _run(config_name: str, method: str, workdir: str, overrides: dict) -> None:
    """`python -m t2s_jax.main --config=configs/<name>[:<method>] --workdir=... --config.<key>=...`,
    in process (the command-line parsing is tested in tests/test_config_schema.py)."""
    config = load(config_name, method)
    config.update_from_flattened_dict(overrides)
    main.run(config, workdir)


@pytest.mark.parametrize("config_name,method", PAIRS, ids=[f"{name}:{method}" if method else name for name, method in PAIRS])
def test_config_trains_evaluates_and_resumes(config_name, method, prepared, tmp_path):
    """Two steps, a checkpoint after each and an evaluation at the end; then (`RESUMES`) the run
    dies after step 1's checkpoint (step 2's is gone) and the same command resumes: step 2
    again, bit for bit, logged once, evaluated and saved. A demo trains the compared method
    whose terms hold the others' (`_demo_superset`); the demo's comparison, resumes and reruns
    are tests/test_faults.py's subject."""
    if (config_name, method) in SAME_AS:
        assert load(config_name, method) == load(*SAME_AS[config_name, method])
        return
    overrides = _tiny_overrides(str(prepared / "tfds"), str(prepared / "mit.pth"))
    if config_name.startswith("synthetic_demo"):  # its own data, tiny encoder and random init, as the demo runs
        overrides = {key: value for key, value in overrides.items() if not key.startswith("model.encoder.")}
        del overrides["model.pretrained"]
        overrides.update({"data.data_dir": str(prepared / "synthetic"), "data.source_resize_hw": (128, 256),
                          "data.target_resize_hw": (128, 256),
                          "compare_methods": (_demo_superset(load(config_name, method)),)})
    if "hrda" in config_name:
        overrides.update(_HRDA_OVERRIDES)
    on_4 = config_name.startswith("gta")
    if "deeplab" in config_name:
        overrides = _encoder_overrides(overrides, _RESNET, str(prepared / "resnet_v1c.pth"), on_4)
    if "vfm" in config_name and not config_name.startswith("synthetic_demo"):
        overrides = _encoder_overrides(overrides, _VIT, str(prepared / "dinov2.pth"), on_4)
        overrides.update(_VFM_OVERRIDES)
    resumes = (config_name, method) in RESUMES
    if not resumes:
        overrides["train.checkpoint_every"] = 2
    workdir = str(tmp_path / "run")
    _run(config_name, method, workdir, overrides)
    runs = eval_mode.find_runs(workdir)
    assert runs, os.listdir(workdir)
    first_losses = {}
    for run in runs:
        assert checkpointing.RunCheckpointer(run).latest_step() == 2
        summary = json.loads(open(os.path.join(run, "eval", "step_2.json")).read())
        assert summary["num_examples"] == 2 and 0.0 <= summary["miou"] <= 1.0
        first_losses[run] = tiny.logged_losses(run)
    if not resumes:
        return
    for run in runs:
        shutil.rmtree(os.path.join(run, "checkpoints", "2"))
    _run(config_name, method, workdir, overrides)
    for run in runs:
        assert checkpointing.RunCheckpointer(run).latest_step() == 2
        assert tiny.logged_losses(run) == first_losses[run]  # steps 1 and 2, once each, the same values

