"""Training throughput per architecture: bf16 autocast + channels_last vs the fp32 NCHW baseline.

    python bench/arch_throughput.py [--archs resnet50,densenet121,convnext_tiny,vit_small]
        [--device cuda] [--batch-size 256] [--resolution PX] [--steps 30] [--warmup 10]
        [--json PATH]

For each architecture of ffcv_bias.train.models, trains on one synthetic batch already on the
device (no loader: this measures the model, not the data pipeline) in two modes, one
after the other, each on a freshly built model with the same initial weights:

  (a) bf16: torch.autocast(dtype=bfloat16), model and inputs in channels_last, the inputs
      in bf16 (what the trainer does on CUDA: Trainer.train_step);
  (b) fp32: no autocast, model and inputs in the default NCHW layout, fp32 inputs.

A step is the trainer's: forward, loss (label smoothing of the recipe), zero_grad,
backward, gradient clipping if the recipe clips, optimizer step. The optimizer is the
trainer's (ffcv_bias.train.build_optimizer over ffcv_bias.train.param_groups' weight-decay
groups) with the hyper-parameters of the architecture's shipped recipe in rn50_configs/
(RECIPES below), at 1% of the recipe's peak learning rate (LR_FRACTION). `--warmup`
steps (cuDNN autotuning, allocator growth, lazy initialisation) run untimed; the `--steps`
timed ones sit between two device synchronisations. Prints the images/s of (a) and (b),
their ratio (a)/(b) (> 1: bf16 channels_last is faster) and, on CUDA, the peak memory
allocated during the timed steps. torch.backends.cudnn.benchmark is on for CUDA runs.

Resolution: `--resolution` for every architecture, or else each one's default, the middle
of its recipe's training-resolution range: 176 px for the ImageNet ResNets and DenseNet
(ffcv-imagenet's 160 -> 192 px ramp), 224 px for ConvNeXt-Tiny and ViT-Small (ViT needs a
multiple of its 16 px patch), 32 px for the CIFAR-stem ResNets. Every architecture is
checked at its resolution (one image, CPU) before anything is timed.

Bad input (unknown architecture, --device cuda without CUDA, a non-positive count, a
resolution an architecture cannot take) is a one-line error and exit status 2.
`--json PATH` writes every figure atomically, rewritten after each architecture so an
interrupted run keeps what it measured ("complete": false until the end).
"""
import argparse
import gc
import os
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch

from ffcv_bias.common import atomic
from ffcv_bias.common import env
from ffcv_bias.common.errors import EXIT_OK, UserError, main_guard
from ffcv_bias.train.fastargs_strict import ConfigError
from ffcv_bias.train.models import ARCHITECTURES, weight_decay_groups
from ffcv_bias.train.config import bn_weight_decay, resolve_config, wd_exempt

RECIPE_DIR = Path(__file__).resolve().parents[1] / "rn50_configs"
MIB = 2 ** 20
# The step's cost does not depend on the learning rate's value, but the weights must stay
# finite (NaN/inf arithmetic can run at another speed): at the peak lr from the first step,
# with no warm-up, ResNet-50 at lr 1.7 reached a loss of 50 within 7 steps on one batch.
LR_FRACTION = 0.01


class Recipe(NamedTuple):
    config_file: str   # in rn50_configs/: optimizer, weight decay, label smoothing, ...
    num_classes: int   # of the dataset that recipe trains on (the classifier's width)


FASHION_RECIPE = Recipe("fashion_mnist_cpu.yaml", 10)
# ResNet-18 has no recipe of its own here: it gets ResNet-50's (ffcv-imagenet trains its
# ResNet-18 with the same SGD, schedule shape, resolutions and BlurPool).
RECIPES = {
    "resnet18": Recipe("rn50_88_epochs.yaml", 1000),
    "resnet50": Recipe("rn50_88_epochs.yaml", 1000),
    "resnet18_cifar": Recipe("cifar10_resnet18.yaml", 10),
    "resnet50_cifar": Recipe("cifar100_resnet50.yaml", 100),
    "resnet8": FASHION_RECIPE,
    "resnet20": FASHION_RECIPE,
    "resnet32": FASHION_RECIPE,
    "resnet56": FASHION_RECIPE,
    "densenet121": Recipe("densenet121_88_epochs.yaml", 1000),
    "convnext_tiny": Recipe("convnext_tiny_300_epochs.yaml", 1000),
    "vit_small": Recipe("vit_small_300_epochs.yaml", 1000),
}


class Mode(NamedTuple):
    key: str                  # in the JSON
    label: str                # in the table
    amp_dtype: object         # autocast dtype, None: no autocast
    memory_format: object     # of the model's weights and of the inputs
    input_dtype: object


BF16 = Mode("bf16_channels_last", "bf16 CL", torch.bfloat16, torch.channels_last, torch.bfloat16)
FP32 = Mode("fp32_nchw", "fp32 NCHW", None, torch.contiguous_format, torch.float32)
MODES = (FP32, BF16)  # baseline first: it also warms the process up (threads, allocator)


class BenchError(UserError):
    """Bad input: main() prints it on one line and exits with EXIT_USAGE (2)."""


class Plan(NamedTuple):
    """What to time for one architecture."""
    arch: str
    recipe: Recipe
    nested: dict        # the recipe resolved by the trainer's own config parser
    resolution: int
    resolution_source: str
    summary: dict       # recipe_summary(): the recipe's values, as printed and in the JSON


# ==========================================================================================
# Arguments
# ==========================================================================================

class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + message on two lines and exits; we want one line, exit 2."""

    def error(self, message):
        raise BenchError(message)


def count(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value
    return parse


def parse_arguments(argv):
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHITECTURES),
                        help="comma-separated architectures "
                             "(default: all of ffcv_bias.train.models)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=count(1), default=256)
    parser.add_argument("--resolution", type=count(1), default=None,
                        help="image side for every architecture (default: per architecture, "
                             "from its recipe)")
    parser.add_argument("--steps", type=count(1), default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=count(0), default=10,
                        help="untimed steps per mode before the timed ones")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    options = parser.parse_args(argv)
    options.archs = parse_archs(options.archs)
    options.device = parse_device(options.device)
    if options.json is not None:
        check_writable(options.json)
    return options


def check_writable(path):
    """Fail now rather than after a long run: the JSON is written only at the end."""
    if path.is_dir():
        raise BenchError(f"--json {path}: is a directory, expected a file path")
    folder = next((parent for parent in path.absolute().parents if parent.exists()), None)
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise BenchError(f"--json {path}: cannot create files in {folder}")


def parse_archs(text):
    archs = [name.strip() for name in text.split(",")]
    if not all(archs):
        raise BenchError(f"--archs {text!r}: empty architecture name")
    unknown = [name for name in archs if name not in ARCHITECTURES]
    if unknown:
        raise BenchError(f"--archs: unknown architecture {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(ARCHITECTURES)}")
    repeated = sorted({name for name in archs if archs.count(name) > 1})
    if repeated:
        raise BenchError(f"--archs: {', '.join(repeated)} listed more than once")
    return archs


def parse_device(text):
    if text is None:
        return env.default_device()
    try:
        device = torch.device(text)
    except RuntimeError:
        raise BenchError(f"--device {text!r}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise BenchError(f"--device {text!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise BenchError(f"--device {text}: CUDA is not available ({why}; "
                         f"torch {torch.__version__})")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise BenchError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) "
                         "visible")
    return device


# ==========================================================================================
# Recipes and resolutions
# ==========================================================================================

def load_recipe(arch):
    """The architecture's recipe, resolved by the trainer's config parser (its defaults
    fill what the file leaves out)."""
    path = RECIPE_DIR / RECIPES[arch].config_file
    return resolve_config(["--config-file", str(path), f"--model.arch={arch}",
                           # required by the parser; the benchmark reads no data
                           "--data.train_dataset=unused", "--data.val_dataset=unused"])


def default_resolution(nested, recipe):
    """The middle of the recipe's training-resolution range, and where it comes from."""
    low, high = nested["resolution"]["min_res"], nested["resolution"]["max_res"]
    if low == high:
        return low, f"{recipe.config_file}'s training resolution"
    return (low + high) // 2, f"middle of {recipe.config_file}'s {low}-{high} px range"


def plan_runs(options):
    plans = []
    for arch in options.archs:
        recipe = RECIPES.get(arch)
        if recipe is None:  # a model added to ffcv_bias.train.models without a recipe here
            raise BenchError(f"{arch}: no recipe in bench/arch_throughput.py's RECIPES")
        try:
            nested = load_recipe(arch)
        except ConfigError as error:
            raise BenchError(f"{arch}: recipe {recipe.config_file}: {error}") from None
        if options.resolution is None:
            resolution, source = default_resolution(nested, recipe)
        else:
            resolution, source = options.resolution, "--resolution"
        plan = Plan(arch, recipe, nested, resolution, source, summary={})
        model = build_model(plan, torch.device("cpu"), torch.contiguous_format)
        check_resolution(plan, model)
        plans.append(plan._replace(summary=recipe_summary(plan, model)))
    return plans


def check_resolution(plan, model):
    """One image through the model on the CPU, so a resolution an architecture cannot take
    fails before anything is timed (ViT: not a multiple of 16; small inputs pooled to 0)."""
    model.eval()
    images = torch.zeros(1, 3, plan.resolution, plan.resolution)
    try:
        with torch.no_grad():
            model(images)
    except (ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise BenchError(f"{plan.arch} cannot take {plan.resolution} px images "
                         f"({plan.resolution_source}): {type(error).__name__}: "
                         f"{first_line}") from None


# ==========================================================================================
# Timing
# ==========================================================================================

def build_model(plan, device, memory_format):
    """The recipe's model, freshly initialized from seed 0 (both modes start from the same
    weights), in training mode."""
    from ffcv_bias.studies import trained
    try:
        model = trained.build_model(plan.arch, plan.recipe.num_classes, seed=0,
                                    **trained.model_options(plan.nested))
    except ValueError as error:
        raise BenchError(f"{plan.arch}: recipe {plan.recipe.config_file}: {error}") from None
    return model.to(device, memory_format=memory_format).train()


def build_optimizer_for(plan, model):
    # Imported here, not at the top: ffcv_bias.train loads ffcv (seconds), which a bad
    # argument should not have to wait for.
    from ffcv_bias.train.optimizer import build_optimizer
    training = plan.nested["training"]
    groups = weight_decay_groups(model, training["weight_decay"],
                                 bn_weight_decay=bn_weight_decay(plan.nested),
                                 exempt=wd_exempt(plan.nested))
    optimizer = build_optimizer(training["optimizer"], groups, training)
    for group in optimizer.param_groups:
        group["lr"] = LR_FRACTION * plan.nested["lr"]["lr"]
    return optimizer


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(plan, mode, device, batch_size):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch_size, 3, plan.resolution, plan.resolution, generator=generator)
    labels = torch.randint(plan.recipe.num_classes, (batch_size,), generator=generator)
    images = images.to(device).contiguous(memory_format=mode.memory_format)
    return images.to(mode.input_dtype), labels.to(device)


def training_step(model, optimizer, loss_fn, images, labels, mode, device, grad_clip_norm):
    """Trainer.train_step without its loader and lr schedule."""
    autocast = (torch.autocast(device.type, dtype=mode.amp_dtype) if mode.amp_dtype
                else nullcontext())
    with autocast:
        loss = loss_fn(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    return loss.detach()


def time_mode(plan, mode, device, batch_size, steps, warmup):
    """images/s of `steps` training steps after `warmup` untimed ones (dict for the JSON)."""
    training = plan.nested["training"]
    model = build_model(plan, device, mode.memory_format).train()
    optimizer = build_optimizer_for(plan, model)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=training["label_smoothing"])
    step = (model, optimizer, loss_fn, *synthetic_batch(plan, mode, device, batch_size),
            mode, device, training["grad_clip_norm"])
    try:
        figures = run_steps(step, device, steps, warmup)
    except torch.cuda.OutOfMemoryError:
        figures = {"error": f"out of memory at batch {batch_size}, {plan.resolution} px"}
    # Free this mode's model, optimizer state and batch before the next mode is built, so
    # that its peak memory is its own.
    del model, optimizer, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "seconds" in figures:
        figures["images_per_second"] = steps * batch_size / figures["seconds"]
    return figures


def run_steps(step, device, steps, warmup):
    for _ in range(warmup):
        training_step(*step)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak of the timed steps only
    started = time.perf_counter()
    losses = [training_step(*step) for _ in range(steps)]
    synchronize(device)
    seconds = time.perf_counter() - started
    losses = torch.stack(losses).float().cpu()
    return {"seconds": seconds,
            "peak_memory_bytes": (torch.cuda.max_memory_allocated(device)
                                  if device.type == "cuda" else None),
            "final_loss": float(losses[-1]), "losses_finite": bool(torch.isfinite(losses).all())}


def measure(plan, options):
    result = {"arch": plan.arch, "resolution": plan.resolution,
              "resolution_source": plan.resolution_source, "batch_size": options.batch_size,
              **plan.summary}
    for mode in MODES:
        result[mode.key] = time_mode(plan, mode, options.device, options.batch_size,
                                     options.steps, options.warmup)
    rates = [result[mode.key].get("images_per_second") for mode in (BF16, FP32)]
    result["ratio_bf16_over_fp32"] = rates[0] / rates[1] if all(rates) else None
    return result


# ==========================================================================================
# Report
# ==========================================================================================

def recipe_summary(plan, model):
    training, model_config = plan.nested["training"], plan.nested["model"]
    groups = weight_decay_groups(model, training["weight_decay"],
                                 bn_weight_decay=bn_weight_decay(plan.nested),
                                 exempt=wd_exempt(plan.nested))
    return {"recipe": plan.recipe.config_file, "num_classes": plan.recipe.num_classes,
            "optimizer": training["optimizer"], "recipe_peak_lr": plan.nested["lr"]["lr"],
            "lr": LR_FRACTION * plan.nested["lr"]["lr"],
            "weight_decay": training["weight_decay"],
            "param_group_sizes": {group["group_name"]: len(group["params"])
                                  for group in groups},
            "label_smoothing": training["label_smoothing"],
            "grad_clip_norm": training["grad_clip_norm"],
            "drop_path": model_config["drop_path"], "dropout": model_config["dropout"],
            "use_blurpool": bool(training["use_blurpool"])}


def describe_plan(plan, batch_size):
    summary = plan.summary
    groups = summary["param_group_sizes"]
    extras = [f"label smoothing {summary['label_smoothing']}"]
    if summary["grad_clip_norm"] > 0:
        extras.append(f"grad clip {summary['grad_clip_norm']}")
    if summary["drop_path"] > 0:
        extras.append(f"drop_path {summary['drop_path']}")
    if summary["use_blurpool"]:
        extras.append("blurpool")
    return (f"  {plan.arch}: {plan.resolution} px ({plan.resolution_source}), batch "
            f"{batch_size}, {summary['num_classes']} classes; {summary['recipe']}: "
            f"{summary['optimizer']} lr {summary['lr']:g} ({LR_FRACTION:.0%} of its peak), "
            f"weight decay {summary['weight_decay']:g} on {groups.get('decay', 0)} tensors "
            f"({groups.get('no_decay', 0)} exempt), {', '.join(extras)}")


def cpu_description():
    native_bf16 = sorted(env.cpu_flags() & {"avx512_bf16", "amx_bf16"}) or ["none"]
    return (f"{env.cpu_model()}, {os.cpu_count()} cores ({env.usable_cpu_count()} usable), "
            f"native bf16 instructions: {', '.join(native_bf16)}")


def machine_lines(device):
    lines = [f"versions: python {sys.version.split()[0]}, torch {torch.__version__}"
             + (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
                if device.type == "cuda" else "")]
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        lines.insert(0, f"device: {device} {properties.name}, "
                        f"{properties.total_memory / 2 ** 30:.0f} GiB; host {cpu_description()}")
        lines.append("fp32 baseline under torch's defaults: cudnn.allow_tf32="
                     f"{torch.backends.cudnn.allow_tf32} (convolutions may use TF32), "
                     f"float32 matmul precision '{torch.get_float32_matmul_precision()}'; "
                     "cudnn.benchmark on")
        if not torch.cuda.is_bf16_supported():
            lines.append("WARNING: this GPU has no native bf16: bf16 figures are emulated")
    else:
        lines.insert(0, f"device: cpu, {cpu_description()}, "
                        f"{torch.get_num_threads()} torch threads")
    return lines


def format_rate(figures):
    return f"{figures['images_per_second']:.1f}" if "images_per_second" in figures else "OOM"


def format_peak(figures):
    peak = figures.get("peak_memory_bytes")
    return "n/a" if peak is None else f"{peak / MIB:.0f}"


TABLE_HEADER = (f"{'arch':<15} {'px':>4} {'batch':>5} {'fp32 NCHW img/s':>16} "
                f"{'bf16 CL img/s':>14} {'(a)/(b)':>8} {'fp32 peak MiB':>14} "
                f"{'bf16 peak MiB':>14}")


def table_row(result):
    fp32, bf16 = result[FP32.key], result[BF16.key]
    ratio = result["ratio_bf16_over_fp32"]
    return (f"{result['arch']:<15} {result['resolution']:>4} {result['batch_size']:>5} "
            f"{format_rate(fp32):>16} {format_rate(bf16):>14} "
            f"{'n/a' if ratio is None else f'{ratio:.2f}':>8} "
            f"{format_peak(fp32):>14} {format_peak(bf16):>14}")


def warnings_for(result):
    return [f"WARNING: {result['arch']} {mode.label}: the loss became non-finite (NaN/inf "
            "arithmetic can run at another speed)"
            for mode in MODES if result[mode.key].get("losses_finite") is False]


def write_json(path, header, results, complete):
    if path is not None:
        atomic.write_json(path, {**header, "complete": complete, "results": results})


@main_guard()
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    options = parse_arguments(argv)
    plans = plan_runs(options)
    if options.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    command = shlex.join(["python", "bench/arch_throughput.py", *argv])
    machine = machine_lines(options.device)
    load_before = os.getloadavg()[0]
    print(f"command: {command}", *machine,
          f"1-min load average before: {load_before:.2f}",
          f"per mode: {options.warmup} untimed warm-up steps, then {options.steps} timed steps "
          "on one synthetic batch already on the device",
          "(a) bf16 CL: bf16 autocast, channels_last model and bf16 inputs; "
          "(b) fp32 NCHW: no autocast, default layout; (a)/(b) > 1: (a) is faster",
          "per architecture (optimizer and regularizers of its recipe in rn50_configs/):",
          sep="\n", flush=True)
    for plan in plans:
        print(describe_plan(plan, options.batch_size), flush=True)
    header = {"command": command, "machine": machine, "device": str(options.device),
              "torch": torch.__version__, "load_average_before": load_before,
              "settings": {"batch_size": options.batch_size, "steps": options.steps,
                           "warmup": options.warmup, "resolution": options.resolution}}
    print("", TABLE_HEADER, sep="\n", flush=True)
    results = []
    for plan in plans:
        results.append(measure(plan, options))
        print(table_row(results[-1]), flush=True)
        write_json(options.json, header, results, complete=False)
    for result in results:
        for warning in warnings_for(result):
            print(warning)
    header["load_average_after"] = os.getloadavg()[0]
    print(f"1-min load average after: {header['load_average_after']:.2f}")
    write_json(options.json, header, results, complete=True)
    if options.json is not None:
        print(f"figures written to {options.json}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
