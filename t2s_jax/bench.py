r"""Step benchmark: compile time, first step, step time, images/s, TFLOP/s and peak memory.

  python -m t2s_jax.bench --config=configs/gta_cs_daformer.py \
      --methods=source_only,daformer,t2s --dtypes=float32,bfloat16 --steps=50 --json=bench.json
  # on a GPU: both attention implementations, and the same model in PyTorch side by side
  python -m t2s_jax.bench --config=configs/gta_cs_daformer.py --dtypes=bfloat16 \
      --attention=cudnn,xla --torch_reference

Config overrides work as in `t2s_jax.main` (`--config.data.crop_hw="(64,64)"`). One row per
(method, dtype, attention implementation). Each row
builds the training step exactly as the loop does (`training.train_state.create_train_state`,
`jit_train_step`: same shardings, same donation) and feeds it one synthetic batch
of the config's shapes (random uint8 images, blocky random labels over all classes), so
no dataset and no pretrained weights are needed (`model.pretrained` is cleared).

Columns: compile = lower + compile of the step; first step = from the start of the row
(state init included) to the first step's results; step = median over `--steps` steps
after `--warmup` more, each waited for; images/s = the images a step trains on (B source,
plus B target for the UDA methods) / median step; TFLOP/s (model) = FLOPs of the step
as written (XLA cost analysis of the lowered step, blocks unrolled; the MFU convention)
per device / median step; TFLOP/s (compiled) = the same from the compiled step's cost
analysis, i.e. what the backend executes after its rewrites (* = scanned blocks, whose
loop bodies XLA counts once); memory = the devices' peak bytes in use
where the backend reports it (GPU, TPU; process-wide, so run one row per process for
per-row peaks), else the compiled step's footprint (arguments + outputs + temporaries -
donated aliases) from `memory_analysis()`.

`--torch_reference` then times the same model in PyTorch on one device (`bench_torch`: a
source-only train step as mmseg runs it, and a teacher forward, per dtype) on the rows'
source images, prints its table and, for each dtype with a source-only row, the ratio of
the two source-only steps. It needs `torch` and `transformers`, imported only then.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from t2s_jax import methods, parallel
from t2s_jax.classes import IGNORE_INDEX
from t2s_jax.models import encoders, layers, mit
from t2s_jax.training import train_state


# Labels are constant on square blocks of this side, so ClassMix masks, stride-32 feature
# distance cells and class prototypes of the pulling loss see realistic, non-degenerate input.
_LABEL_BLOCK = 32
_IGNORE_SHARE = 0.05


@dataclasses.dataclass
class BenchRow:
    method: str
    dtype: str
    devices: int
    device_kind: str
    batch_per_domain: int  # global B
    crop_hw: tuple[int, int]
    images_per_step: int
    compile_s: float  # lower + compile
    first_step_s: float  # state init + compile + first step
    step_ms: float  # median
    step_ms_spread: tuple[float, float]  # 10th and 90th percentile
    images_per_s: float
    model_flops: float  # per device and step, the step as written (see `model_flops`)
    compiled_flops: float  # per device and step, XLA's count of the compiled step
    model_tflops_per_s: float
    compiled_tflops_per_s: float
    memory_bytes: int
    memory_source: str
    compiled_memory: dict[str, int]
    final_loss: float
    options: dict[str, Any]


def synthetic_host_batch(
    data_config: ml_collections.ConfigDict,
    num_classes: int,
    *,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, np.ndarray]:
    """This process's share of a training batch with the pipeline's keys, shapes and dtypes."""
    if data_config.batch_size % process_count:
        raise ValueError(
            f"config.data.batch_size={data_config.batch_size} is not divisible by {process_count} processes"
        )
    batch = data_config.batch_size // process_count
    height, width = tuple(data_config.crop_hw)
    rng = np.random.default_rng([seed, process_index])

    def labels() -> np.ndarray:
        blocks = (batch, -(-height // _LABEL_BLOCK), -(-width // _LABEL_BLOCK))
        coarse = rng.integers(0, num_classes, blocks, dtype=np.uint8)
        coarse[rng.random(blocks) < _IGNORE_SHARE] = IGNORE_INDEX
        fine = coarse.repeat(_LABEL_BLOCK, axis=1).repeat(_LABEL_BLOCK, axis=2)
        return np.ascontiguousarray(fine[:, :height, :width])

    domains = ("source", "target") if data_config.target else ("source",)
    host_batch = {}
    for domain in domains:
        host_batch[f"{domain}_image"] = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
        host_batch[f"{domain}_label"] = labels()
    return host_batch


def row_config(
    config: ml_collections.ConfigDict, method: str, dtype: str, attention_impl: str | None = None
) -> ml_collections.ConfigDict:
    """`config` with `method`, compute `dtype` and `attention_impl` (None: the config's), and no
    pretrained weights to read."""
    if method not in methods.PRESETS:
        raise ValueError(f"--methods: unknown method {method!r}; expected some of {tuple(methods.PRESETS)}")
    if dtype not in layers.DTYPES:
        raise ValueError(f"--dtypes: unknown dtype {dtype!r}; expected some of {sorted(layers.DTYPES)}")
    row = methods.with_method(config, method)  # the rules a config file of that method follows
    row.model.dtype = dtype
    row.model.pretrained = ""
    if attention_impl is not None:
        try:
            mit.attention_implementation(attention_impl)
        except ValueError as error:
            raise ValueError(f"--attention: {error}") from None
        row.model.attention_impl = attention_impl
    return row


def _images_per_step(config: ml_collections.ConfigDict) -> int:
    return config.data.batch_size * (2 if config.data.target else 1)


def _cost_flops(stage) -> float:
    analysis = stage.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # some jax versions: one dict per program
        analysis = analysis[0]
    return float((analysis or {}).get("flops", float("nan")))


def model_flops(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch, lowered) -> float:
    """FLOPs of the step as written (lowered, before backend rewrites), per device.

    The compiled count differs in two ways: a backend may rewrite ops into costlier ones
    (XLA:CPU turns the depthwise-conv filter gradient into a dense convolution, ~30x the
    work), and loop bodies (scanned blocks) count once, not once per iteration. So the
    model count lowers the same step with unrolled blocks.
    """
    if not config.model.scan_blocks:
        return _cost_flops(lowered)
    unrolled = ml_collections.ConfigDict(config.to_dict())
    unrolled.model.scan_blocks = False
    num_steps = config.train.num_steps
    graphdef, state, imagenet_variables, optimizer = train_state.abstract_train_state(unrolled, num_steps)
    step = train_state.jit_train_step(unrolled, graphdef, optimizer, mesh, num_steps)
    return _cost_flops(step.lower(state, batch, imagenet_variables))


def _memory(compiled, mesh: jax.sharding.Mesh, *, ran: bool) -> tuple[int, str, dict[str, int]]:
    analysis = compiled.memory_analysis()
    figures = {
        name: int(getattr(analysis, f"{name}_size_in_bytes", 0) or 0)
        for name in ("argument", "output", "alias", "temp", "generated_code")
    }
    figures["footprint"] = figures["argument"] + figures["output"] + figures["temp"] - figures["alias"]
    peaks = []
    for device in mesh.devices.flat if ran else ():
        if device.process_index != jax.process_index():
            continue
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), "device peak_bytes_in_use (process-wide)", figures
    return figures["footprint"], "compiled memory_analysis (args + outputs + temps - aliased)", figures


def _abstract_batch(host_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    sharding = parallel.data_sharded(mesh)
    return {
        key: jax.ShapeDtypeStruct((value.shape[0] * jax.process_count(), *value.shape[1:]), value.dtype, sharding=sharding)
        for key, value in host_batch.items()
    }


def _time_steps(compiled, state, batch, imagenet_variables, *, warmup: int, steps_timed: int):
    """(seconds of each timed step, metrics of the last step)."""
    for _ in range(warmup):
        state, metrics = compiled(state, batch, imagenet_variables)
    times = []
    for _ in range(steps_timed):
        step_start = time.perf_counter()
        state, metrics = compiled(state, batch, imagenet_variables)
        # One executable: its outputs complete together, so the small metrics stand for the state.
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - step_start)
    return times, metrics


def benchmark(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, steps_timed: int, warmup: int
) -> BenchRow:
    """Times the training step of `config` (method, dtype, shapes) on `mesh`.

    steps_timed=0 compiles and analyses the step without running it (no state is
    materialised: shapes only), e.g. to read a large model's memory needs on a small host.
    """
    num_devices = mesh.devices.size
    if config.data.batch_size % num_devices:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} must be divisible by the {num_devices} devices"
        )
    num_steps = config.train.num_steps
    host_batch = synthetic_host_batch(
        config.data, config.model.num_classes, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    start = time.perf_counter()
    if steps_timed > 0:
        graphdef, state, imagenet_variables, optimizer = train_state.create_train_state(config, mesh, num_steps)
        batch = parallel.global_batch(host_batch, mesh)
    else:
        graphdef, state, imagenet_variables, optimizer = train_state.abstract_train_state(config, num_steps)
        batch = _abstract_batch(host_batch, mesh)
    step = train_state.jit_train_step(config, graphdef, optimizer, mesh, num_steps)
    compile_start = time.perf_counter()
    lowered = step.lower(state, batch, imagenet_variables)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - compile_start

    nan = float("nan")
    first_step_s, times, final_loss = nan, [nan], nan
    if steps_timed > 0:
        state, metrics = compiled(state, batch, imagenet_variables)
        jax.block_until_ready(metrics)
        first_step_s = time.perf_counter() - start
        times, metrics = _time_steps(compiled, state, batch, imagenet_variables, warmup=warmup, steps_timed=steps_timed)
        final_loss = float(jax.device_get(metrics["loss"]))
    step_s = statistics.median(times)

    flops = model_flops(config, mesh, batch, lowered)
    flops_compiled = _cost_flops(compiled)
    memory_bytes, memory_source, compiled_memory = _memory(compiled, mesh, ran=steps_timed > 0)
    images = _images_per_step(config)
    return BenchRow(
        method=config.method,
        dtype=config.model.dtype,
        devices=num_devices,
        device_kind=mesh.devices.flat[0].device_kind,
        batch_per_domain=config.data.batch_size,
        crop_hw=tuple(config.data.crop_hw),
        images_per_step=images,
        compile_s=compile_s,
        first_step_s=first_step_s,
        step_ms=1000 * step_s,
        step_ms_spread=tuple(1000 * float(q) for q in np.percentile(times, [10, 90])),
        images_per_s=images / step_s,
        model_flops=flops,
        compiled_flops=flops_compiled,
        model_tflops_per_s=flops / step_s / 1e12,
        compiled_tflops_per_s=flops_compiled / step_s / 1e12,
        memory_bytes=memory_bytes,
        memory_source=memory_source,
        compiled_memory=compiled_memory,
        final_loss=final_loss,
        options={
            "scan_blocks": bool(config.model.scan_blocks),
            "remat": str(config.model.remat),
            "attention_impl": config.model.attention_impl or "default",
        },
    )


def _format_bytes(count: int) -> str:
    if count >= 2**30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.1f} MiB"


def _format(value: float, spec: str) -> str:
    return "–" if np.isnan(value) else format(value, spec)


def format_table(rows: list[BenchRow]) -> str:
    """The rows as one markdown table."""
    lines = [
        "| method | dtype | attention | compile (s) | first step (s) | step (ms, median) | images/s "
        "| GFLOP/step (model) | TFLOP/s (model) | TFLOP/s (compiled) | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        memory_kind = "device peak" if row.memory_source.startswith("device") else "compiled est."
        scanned = "*" if row.options["scan_blocks"] else ""
        lines.append(
            f"| {row.method} | {row.dtype} | {row.options['attention_impl']} | {row.compile_s:.1f} "
            f"| {_format(row.first_step_s, '.1f')} "
            f"| {_format(row.step_ms, '.1f')} | {_format(row.images_per_s, '.2f')} "
            f"| {row.model_flops / 1e9:.1f} | {_format(row.model_tflops_per_s, '.3f')} "
            f"| {_format(row.compiled_tflops_per_s, '.3f')}{scanned} "
            f"| {_format_bytes(row.memory_bytes)} ({memory_kind}) |"
        )
    return "\n".join(lines)


def format_comparison(rows: list[BenchRow], torch_rows: list) -> list[str]:
    """One line per source-only row with a PyTorch train step of its dtype: the ratio of the steps."""
    torch_steps = {row.dtype: row for row in torch_rows if row.pass_name == "train step"}
    lines = []
    for row in rows:
        reference = torch_steps.get(row.dtype)
        if row.method != "source_only" or reference is None or np.isnan(row.step_ms):
            continue
        lines.append(
            f"source-only step, {row.dtype}, attention {row.options['attention_impl']}: t2s_jax {row.step_ms:.1f} ms "
            f"on {row.devices} x {row.device_kind}, PyTorch {reference.step_ms:.1f} ms on {reference.device}: "
            f"PyTorch / t2s_jax = {reference.step_ms / row.step_ms:.2f}"
        )
    return lines


def _import_torch_reference():
    """`t2s_jax.bench_torch`, or a one-line usage error when PyTorch or transformers is missing."""
    try:
        return importlib.import_module("t2s_jax.bench_torch")
    except ImportError as error:
        raise app.UsageError(
            f"--torch_reference needs torch and transformers (pip install -e '.[torch_reference]'): {error}"
        ) from None


def describe_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """What the figures depend on besides method and dtype."""
    return {
        "device": f"{mesh.devices.size} x {mesh.devices.flat[0].device_kind}",
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "processes": jax.process_count(),
        "encoder": encoders.describe(config.model.encoder),
        "head": config.model.head,
        "batch_per_domain": config.data.batch_size,
        "crop_hw": tuple(config.data.crop_hw),
    }


def _define_flags() -> None:
    """The command's flags, defined only when it runs: importing this module (the tests) must
    not claim `--config`, which `t2s_jax.main` defines too."""
    config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.", lock_config=True)
    flags.DEFINE_list("methods", ["source_only", "daformer", "t2s"], "Methods to time (config.method presets).")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to time (config.model.dtype values).")
    flags.DEFINE_list(
        "attention", [], "config.model.attention_impl values to time, one row each (e.g. cudnn,xla); none: the config's."
    )
    flags.DEFINE_integer(
        "steps", 50, "Timed steps per row (the median is reported); 0 = compile and analyse only, run nothing."
    )
    flags.DEFINE_integer("warmup", 3, "Untimed steps after the first one.")
    flags.DEFINE_string("json", "", "Also write the rows as JSON to this path.")
    flags.DEFINE_bool(
        "torch_reference", False, "Also time the same model in PyTorch (t2s_jax.bench_torch; needs torch, transformers)."
    )
    flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    options = flags.FLAGS
    config = options.config
    if options.torch_reference and options.steps <= 0:
        raise app.UsageError("--torch_reference times steps: it needs --steps > 0")
    if options.torch_reference and (encoders.encoder_type(config.model.encoder) != "mit" or config.model.head == "deeplabv2"):
        raise app.UsageError("--torch_reference is the MiT segmentor (SegFormer encoder + DAFormer/SegFormer head) only")
    bench_torch = _import_torch_reference() if options.torch_reference else None
    attention_impls = options.attention or [None]
    row_configs = [
        row_config(config, m, d, a) for m in options.methods for d in options.dtypes for a in attention_impls
    ]
    torch_rows = []
    if bench_torch is not None:  # first: it returns the accelerator's memory before JAX reserves its share
        host_batch = synthetic_host_batch(config.data, config.model.num_classes, seed=config.seed)
        torch_rows = bench_torch.benchmark(config, host_batch, options.dtypes, steps=options.steps, warmup=options.warmup)
        for row in torch_rows:
            print(f"PyTorch {row.pass_name} {row.dtype}: {row.step_ms:.1f} ms", flush=True)
    mesh = parallel.make_mesh(config.num_devices)
    setup = describe_setup(config, mesh)
    rows = []
    for run_config in row_configs:
        rows.append(benchmark(run_config, mesh, steps_timed=options.steps, warmup=options.warmup))
        print(f"{run_config.method} {run_config.model.dtype}: {rows[-1].step_ms:.1f} ms/step", flush=True)
    print(", ".join(f"{k}: {v}" for k, v in setup.items()))
    print(format_table(rows), flush=True)
    if torch_rows:
        print(bench_torch.format_table(torch_rows))
        print("\n".join(format_comparison(rows, torch_rows)), flush=True)
    if options.json and jax.process_index() == 0:
        report = {"setup": setup, "rows": [dataclasses.asdict(r) for r in rows]}
        report["torch_rows"] = [dataclasses.asdict(r) for r in torch_rows]
        with open(options.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
