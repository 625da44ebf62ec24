"""The config schema and the doors around it: every key has a rule, values are checked by type
and range before anything is built, and every (config, method) a user can ask for loads,
states the number it targets and is in the README's table."""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from t2s_jax import benchmarks, config as schema, evaluate, main, methods
from flax import nnx

from t2s_jax.models import build_segmentor, encoders, layers, mit, vit
from t2s_jax.uda import mic

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

# Sections whose options their loss term checks when it is built.
TERM_SECTIONS = ("uda", "mic", "masktwins", "pull", "distill")


def config_module(name: str):
    spec = importlib.util.spec_from_file_location(f"config_{name[:-3]}", os.path.join(tiny.REPO, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_pairs() -> list[tuple[str, str]]:
    """Every (config file, method) of configs/ a user can ask for; the demo takes no method."""
    pairs = []
    for path in sorted(glob.glob(os.path.join(tiny.REPO, "configs", "*.py"))):
        name = os.path.basename(path)
        pairs += [(name, method) for method in getattr(config_module(name), "TARGETS", {"": None})]
    return pairs


def load(name: str, method: str):
    return main.load_config_file(os.path.join(tiny.REPO, "configs", f"{name}:{method}" if method else name))


def _leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_key_outside_the_terms_sections_has_a_rule():
    config = schema.default_config()
    keys = {key for key in _leaves(config) if key.split(".")[0] not in TERM_SECTIONS}
    assert keys == set(schema.rules_for(config))
    for encoder in (schema.resnet_config(50), schema.vit_config("b")):
        config.model.encoder = encoder
        keys = {key for key in _leaves(config) if key.split(".")[0] not in TERM_SECTIONS}
        assert keys == set(schema.rules_for(config))
    assert set(schema.ENCODER_RULES) == set(schema.ENCODER_TYPES)


def test_the_choices_of_the_rules_are_the_codes():
    """Each enum of the schema is what the code that reads it accepts, and nothing more."""
    assert set(schema.DTYPES) == set(layers.DTYPES)
    assert set(schema.REMAT) == set(layers.REMAT_POLICIES)
    assert set(schema.ENCODER_TYPES) == set(encoders._BUILDERS)  # noqa: SLF001
    for stem in schema.RESNET_STEMS:
        assert resnet_model(stem).embed_dims == (256, 512, 1024, 2048)
    with pytest.raises(ValueError, match="config.model.encoder.stem"):
        resnet_model("3x3")
    assert set(schema.POS_INTERPOLATIONS) == set(vit.POS_INTERPOLATIONS)
    assert set(schema.SOURCE_LOSS_MEANS) == {"all", "valid"} and set(mic.MASK_TYPES) == {"block", "token"}
    for ffn in schema.VIT_FFNS:
        model_config = schema.default_config().model
        model_config.encoder = schema.vit_config("s", ffn=ffn, depth=1)
        encoder = nnx.eval_shape(lambda: encoders.build_encoder(model_config.encoder, model_config, rngs=nnx.Rngs(0)))
        assert encoder.ffn == ffn
    for head in schema.HEADS:
        model_config = schema.default_config().model
        model_config.encoder = schema.mit_config("b0", depths=(1, 1, 1, 1))
        model_config.head = head
        assert nnx.eval_shape(lambda: build_segmentor(model_config, rngs=nnx.Rngs(0))).head is not None
    model_config.head = "upernet"
    with pytest.raises(ValueError, match="unknown head"):
        build_segmentor(model_config, rngs=nnx.Rngs(0))
    for name in schema.ATTENTION_IMPLS:
        mit.attention_implementation(name)
    with pytest.raises(ValueError):
        mit.attention_implementation("flash")
    import jax.numpy as jnp

    images = jnp.zeros((1, 16, 16, 3))
    for mode in schema.EVAL_MODES:
        logits = evaluate.predict_logits(lambda x: jnp.zeros((x.shape[0], 4, 4, 2)), images, mode=mode, crop_hw=(8, 8), stride_hw=(8, 8))
        assert logits.shape == (1, 16, 16, 2)
    with pytest.raises(ValueError):
        evaluate.predict_logits(lambda x: x, images, mode="tiled")


def resnet_model(stem: str):
    model_config = schema.default_config().model
    model_config.encoder = schema.resnet_config(50, stem=stem, depths=(1, 1, 1, 1))
    return nnx.eval_shape(lambda: encoders.build_encoder(model_config.encoder, model_config, rngs=nnx.Rngs(0)))


def test_rules_refuse_wrong_types_and_ranges():
    config = schema.default_config()
    config.data.crop_hw = (128,)
    config.train.num_steps = 0
    config.data.flip_prob = 1.5
    config.eval.slide_stride_hw = (341.0, 341)
    config.model.head = "upernet"
    config.compare_seeds = (0, -1)
    assert schema.check(config) == [
        "config.compare_seeds=(0, -1): expected a tuple of integers >= 0, e.g. (0, 1, 2)",
        "config.model.head='upernet': expected one of 'daformer', 'segformer', 'deeplabv2', 'vfm'",
        "config.data.crop_hw=(128,): expected a tuple of 2 integers >= 1, e.g. (512, 512) (height, width)",
        "config.data.flip_prob=1.5: expected a number in [0, 1]",
        "config.train.num_steps=0: expected an integer >= 1",
        "config.eval.slide_stride_hw=(341.0, 341): expected a tuple of 2 integers >= 1, e.g. (512, 512) (height, width)",
    ]
    config = schema.default_config()
    config.model.encoder = schema.resnet_config(101, stem="deep3x3", stem_channels=3)
    assert schema.check(config) == [
        "config.model.encoder.stem='deep3x3': expected one of 'deep', '7x7'",
        "config.model.encoder.stem_channels=3: expected an even integer >= 2, e.g. 64",
    ]
    config.model.encoder.type = "swin"
    assert schema.check(config) == ["config.model.encoder.type='swin': expected one of 'mit', 'resnet', 'vit'"]
    config = schema.default_config()
    config.model.head = "vfm"
    config.optim.layer_decay = 0.9
    assert schema.check(config) == [
        "config.optim.layer_decay=0.9 decays the blocks of a ViT encoder; config.model.encoder.type is 'mit': set it to 1.0",
        "config.model.head='vfm' with config.model.encoder.type='mit': the 'vfm' head reads a ViT's patch tokens "
        "and a ViT feeds only the 'vfm' head",
    ]
    config = schema.default_config()
    config.model.encoder.type = "resnet"  # a MiT encoder relabelled: its ResNet keys are missing
    assert "config.model.encoder.base_widths is missing for encoder type 'resnet': build the encoder with t2s_jax.config.resnet_config()" in schema.check(config)


@pytest.mark.parametrize("name,method", benchmark_pairs())
def test_every_config_and_method_loads_and_passes_the_rules(name, method):
    config = load(name, method)
    assert schema.check(config) == []
    if method:
        host = name[:-3].split("_")[-1]
        presets, settings = {
            "hrda": (benchmarks.HRDA_PRESETS, benchmarks.HRDA_METHOD_SETTINGS),
            "deeplab": (benchmarks.DEEPLAB_PRESETS, benchmarks.DEEPLAB_METHOD_SETTINGS),
            "vfm": (benchmarks.VFM_PRESETS, {}),
            "daformer": ({}, benchmarks.METHOD_SETTINGS),
        }[host]
        assert config.method == presets.get(method, method)
        assert config.model.hrda.enabled == (host == "hrda")
        expected_model = {"deeplab": ("resnet", "deeplabv2"), "vfm": ("vit", "vfm")}.get(host, ("mit", "daformer"))
        assert (config.model.encoder.type, config.model.head) == expected_model
        assert not config.data.target if method in methods.TARGET_FREE else config.data.target == "cityscapes"
        for key, value in settings.get(method, {}).items():
            assert schema.value_of(config, key) == value


def test_the_benchmarks_offer_every_preset_and_dg_only_the_target_free_ones():
    # VFM-UDA's presets are MIC without the feature distance, named for the ViT host.
    vfm_presets = {"vfm_uda", "vfm_uda_fd", "t2s_vfm_uda"}
    for name in ("gta_cs_daformer.py", "synthia_cs_daformer.py"):
        assert set(config_module(name).TARGETS) == set(methods.PRESETS) - vfm_presets, name
    assert set(config_module("gta_dg_daformer.py").TARGETS) == set(methods.TARGET_FREE)
    for name in ("gta_cs_hrda.py", "synthia_cs_hrda.py"):
        assert set(config_module(name).TARGETS) == {"hrda", "mic", "t2s", "t2s_mic", "masktwins"}, name
    for name in ("gta_cs_deeplab.py", "synthia_cs_deeplab.py"):
        assert set(config_module(name).TARGETS) == {"source_only", "daformer", "t2s", "t2s_mse", "mic"}, name
    assert load("gta_cs_deeplab.py", "t2s_mse").pull.loss == "mse" and load("gta_cs_deeplab.py", "t2s").pull.loss == "infonce"
    for name in ("gta_cs_vfm.py", "synthia_cs_vfm.py"):
        assert set(config_module(name).TARGETS) == {"vfm_uda", "vfm_uda_fd", "t2s"}, name
        assert load(name, "t2s,l").model.encoder.embed_dim == 1024 and load(name, "t2s").model.encoder.embed_dim == 768
        with pytest.raises(schema.ConfigError, match="unknown ViT variant 'h'"):
            load(name, "vfm_uda,h")
    # The default of each file keeps its meaning.
    assert [load(name, "").method for name in ("gta_cs_daformer.py", "synthia_cs_daformer.py", "gta_dg_daformer.py")] == ["t2s", "t2s", "dg"]


def _readme_table() -> dict[str, str]:
    """{`config:method`: target} of the README's table of configs."""
    with open(os.path.join(tiny.REPO, "README.md")) as f:
        readme = f.read()
    return {cells[0]: cells[-1] for cells in (
        [cell.strip() for cell in row.strip().strip("|").split("|")]
        for row in re.findall(r"^\| `configs/[^\n]*$", readme, flags=re.M)
    )}  # fmt: skip


def test_the_readme_lists_every_config_and_method_with_its_target():
    expected = {}
    for name, method in benchmark_pairs():
        targets = getattr(config_module(name), "TARGETS", {"": "—"})
        expected[f"`configs/{name}:{method}`" if method else f"`configs/{name}`"] = targets[method]
    assert _readme_table() == expected


def test_the_renamed_configs_point_to_a_config_and_method_that_exist():
    pairs = set(benchmark_pairs())
    for old, new in main._RENAMED_CONFIGS.items():  # noqa: SLF001
        assert not os.path.exists(os.path.join(tiny.REPO, "configs", old))
        assert tuple(new.split(":")) in pairs, new


# ---------------------------------------------------------------------------- the command


def _command(workdir, *flags, config="configs/synthetic_demo.py", path=()):
    python_path = os.pathsep.join(filter(None, [*path, tiny.REPO, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=python_path)
    return subprocess.Popen(
        [sys.executable, "-m", "t2s_jax.main", f"--config={config}", f"--workdir={workdir}", *flags],
        cwd=tiny.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_bad_values_config_arguments_and_renamed_files_are_one_line_exit_2_and_create_nothing(tmp_path):
    cases = {  # name: (flags, config, the error line)
        "not a number": (["--config.train.num_steps=abc"], None,
                         "error: config.train.num_steps=abc (--config.train.num_steps): expected an integer >= 1"),
        "a count of zero": (["--config.train.num_steps=0"], None, "error: config.train.num_steps=0: expected an integer >= 1"),
        "one number for a pair": (["--config.data.crop_hw=128"], None,
                                  "error: config.data.crop_hw=(128,): expected a tuple of 2 integers >= 1"),
        "not a probability": (["--config.data.flip_prob=2"], None, "error: config.data.flip_prob=2.0: expected a number in [0, 1]"),
        "an unknown choice": (["--config.eval.mode=tiled"], None, "error: config.eval.mode='tiled': expected one of 'whole', 'slide'"),
        "not a boolean": (["--config.data.rcs.enabled=maybe"], None,
                          "error: config.data.rcs.enabled=maybe (--config.data.rcs.enabled): expected True or False"),
        "a term's option": (["--config.pull.num_queries=many"], None,
                            "error: config.pull.num_queries=many (--config.pull.num_queries): expected an integer"),
        "unknown method argument": ([], "configs/gta_cs_daformer.py:mic2",
                                    "error: --config=configs/gta_cs_daformer.py:mic2: unknown method 'mic2' for this config; "
                                    "expected one of t2s, daformer,"),
        "a method that needs target data for DG": ([], "configs/gta_dg_daformer.py:t2s",
                                                   "error: --config=configs/gta_dg_daformer.py:t2s: unknown method 't2s' "
                                                   "for this config; expected one of dg, source_only"),
        "renamed file": ([], "configs/synthia_cs_mic.py",
                         "error: config file configs/synthia_cs_mic.py was renamed: use --config=configs/synthia_cs_daformer.py:mic"),
    }  # fmt: skip
    started = {
        name: _command(tmp_path / name.replace(" ", "_") / "run", *extra,
                       **({"config": config} if config else {}))
        for name, (extra, config, _) in cases.items()
    }  # fmt: skip
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (name, stdout[-2000:], stderr[-2000:])
        (line,) = stderr.splitlines()
        assert line.startswith(cases[name][2]), (name, line)
        assert not os.path.exists(tmp_path / name.replace(" ", "_")), name
