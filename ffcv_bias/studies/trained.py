"""A trained model, once: from a run directory or a bare state_dict file, and what
evaluating it needs (a device, loader workers, the beton's class names).

Every study that evaluates a trained model (preservation, transfer, diet's scores) and
the architecture benchmark build their model here, so a run's model is the same object
whatever reads it: config.json gives the architecture and its options, weights.pt (or a
torchvision / timm / DDP state_dict) the weights, loaded strictly with a one-line error
naming the first mismatch. torch is imported here; `studies/__init__` stays light.
"""
from pathlib import Path

import torch

from ffcv_bias.record import runs
from ffcv_bias.common import env
from ffcv_bias.common.errors import UserError
from ffcv_bias.train.models import ARCHITECTURES, create_model


class StudyError(UserError, ValueError):
    """Bad input for a study: the message is one line naming the problem."""


# ----------------------------------------------------------------------------------------
# Trained models: run directories and bare state_dict files
# ----------------------------------------------------------------------------------------

def read_state_dict(path):
    """A state_dict from a .pt/.pth file: ours (weights.pt, checkpoint.pt), torchvision's,
    or one wrapped in {'state_dict'|'model': ...} and/or saved from DDP ('module.')."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise StudyError(f"cannot read weights {path}: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(content, dict) and isinstance(content.get(wrapper), dict):
            content = content[wrapper]
            break
    if not isinstance(content, dict) or not all(torch.is_tensor(v) for v in content.values()):
        raise StudyError(f"{path} does not hold a state_dict (a mapping name -> tensor)")
    cleaned = {}
    for name, tensor in content.items():
        for prefix in ("module.", "_orig_mod."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        cleaned[name] = tensor
    return cleaned


def describe_run(run_dir):
    """What a run directory says about its model: arch, classes, options, eval settings."""
    run_dir = Path(run_dir)
    config_path = run_dir / runs.CONFIG_FILE
    if not config_path.is_file():
        raise StudyError(f"{run_dir} is not a run directory (no {runs.CONFIG_FILE})")
    config = runs.read_json(config_path)
    summary = {}
    if runs.is_complete(run_dir):
        summary = runs.read_json(run_dir / runs.SUMMARY_FILE)
    validation = config.get("validation", {})
    return {
        "run_dir": str(run_dir),
        "run_id": summary.get("run_id") or config.get("meta", {}).get("run_id") or run_dir.name,
        "config": config,
        "arch": config.get("model", {}).get("arch"),
        **model_options(config),
        "num_classes": summary.get("num_classes"),
        "resolution": validation.get("resolution"),
        "crop_ratio": validation.get("crop_ratio"),
        "weights": str(run_dir / runs.WEIGHTS_FILE),
    }


def classifier_layer(model):
    """(name, module) of the model's final Linear (fc, head, classifier, classifier.2)."""
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)]
    if not linears:
        raise StudyError(f"{type(model).__name__} has no Linear classifier")
    return linears[-1]


def model_options(config):
    """create_model's options as a run's config (nested, as config.json) sets them."""
    model, training = config.get("model", {}), config.get("training", {})
    return {"dropout": float(model.get("dropout", 0.0)),
            "drop_path": float(model.get("drop_path", 0.0)),
            "use_blurpool": bool(training.get("use_blurpool", 0))}


def build_model(arch, num_classes, state_dict=None, *, dropout=0.0, drop_path=0.0,
                use_blurpool=False, source="weights", seed=None):
    """create_model(...) in eval mode, with `state_dict` loaded strictly (a one-line error
    on a mismatch); without one, a fresh init (from torch's seed `seed` when given)."""
    if arch not in ARCHITECTURES:
        raise StudyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if seed is not None:
        torch.manual_seed(seed)
    model = create_model(arch, int(num_classes), dropout=dropout, drop_path=drop_path,
                         use_blurpool=use_blurpool)
    if state_dict is None:
        return model.eval()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(name for name in set(expected) & set(state_dict)
                         if expected[name].shape != state_dict[name].shape)
    if missing or unexpected or wrong_shape:
        details = []
        if wrong_shape:
            name = wrong_shape[0]
            details.append(f"{name} is {tuple(state_dict[name].shape)}, the model wants "
                           f"{tuple(expected[name].shape)}")
        if missing:
            details.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise StudyError(f"{source} do not fit {arch} with {num_classes} classes"
                         f"{' and BlurPool' if use_blurpool else ''}: " + "; ".join(details))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_trained_model(weights, *, arch=None, num_classes=None, use_blurpool=None,
                       default_num_classes=None):
    """(model in eval mode on CPU, info dict) from a run directory or a state_dict file.

    num_classes: explicit value, else the run's summary.json, else `default_num_classes`
    (the evaluated dataset's class count).
    """
    weights = Path(weights)
    if weights.is_dir():
        info = describe_run(weights)
        if not Path(info["weights"]).is_file():
            raise StudyError(f"run {weights} has no {runs.WEIGHTS_FILE} (not finished?)")
        info["arch"] = arch or info["arch"]
        if use_blurpool is not None:
            info["use_blurpool"] = bool(use_blurpool)
    elif weights.is_file():
        if not arch:
            raise StudyError(f"{weights} is a bare state_dict: pass --arch "
                             f"({', '.join(ARCHITECTURES)})")
        info = {"run_dir": None, "run_id": None, "config": None, "arch": arch, "dropout": 0.0,
                "drop_path": 0.0, "use_blurpool": bool(use_blurpool), "num_classes": None,
                "resolution": None, "crop_ratio": None, "weights": str(weights)}
    else:
        raise StudyError(f"--weights {weights}: no such run directory or file")
    info["num_classes"] = int(num_classes or info["num_classes"] or default_num_classes or 0)
    if info["num_classes"] < 1:
        raise StudyError(f"cannot tell how many classes {weights} has: pass --num-classes")
    return model_from_info(info), info


def model_from_info(info):
    """The model `info` (describe_run's, or load_trained_model's) describes, its weights
    loaded, in eval mode on the CPU."""
    return build_model(info["arch"], info["num_classes"], read_state_dict(info["weights"]),
                       dropout=info["dropout"], drop_path=info["drop_path"],
                       use_blurpool=info["use_blurpool"], source=f"weights {info['weights']}")


# ----------------------------------------------------------------------------------------
# Evaluating it: the device, its autocast, loader workers, the beton's class names
# ----------------------------------------------------------------------------------------

def pick_device(name="auto"):
    if name == "auto":
        return env.default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise StudyError("--device cuda: no CUDA device is available")
    return torch.device(name)


def inference_setup(model, device):
    """The model on `device` for evaluation, and the autocast context factory to use."""
    model = model.to(device, memory_format=torch.channels_last).eval()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        return model, lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return model, lambda: torch.autocast("cpu", enabled=False)


def read_class_names(beton_path):
    """Class names from the beton's .classes.json sidecar (a clear error when missing)."""
    from ffcv_bias.data.sources import DatasetError
    from ffcv_bias.data.sidecar import read_classes
    try:
        return list(read_classes(beton_path)["classes"])
    except DatasetError as error:
        raise StudyError(str(error)) from None


def default_workers():
    return max(1, min(8, env.usable_cpu_count()))
