"""Write tests/data/<arch>_keys.txt and model_reference_logits.json from the references.

Needs torchvision (0.29.2 was used) and timm (1.0.31) importable; they are NOT
dependencies of ffcv_bias and this script is not part of the test suite. It was run as

    PYTHONPATH=<unpacked torchvision and timm wheels> python tests/data/make_model_reference.py

(torchvision's C extension does not load against the CPU torch; its model code does not
need it.) The deterministic weights and images come from tests/deterministic_weights.py,
so the test rebuilds the very same inputs.
"""
import json
import sys
from pathlib import Path

import timm
import torch
import torchvision
import torchvision.models as tv_models

DATA_DIR = Path(__file__).parent
sys.path.insert(0, str(DATA_DIR.parent))
from deterministic_weights import deterministic_images, deterministic_state_dict  # noqa: E402

TORCHVISION = f"torchvision {torchvision.__version__.split('+')[0]}"
TIMM = f"timm {timm.__version__}"
PUBLISHED = {
    "resnet18": (lambda: tv_models.resnet18(), f"{TORCHVISION} models.resnet18()"),
    "resnet50": (lambda: tv_models.resnet50(), f"{TORCHVISION} models.resnet50()"),
    "densenet121": (lambda: tv_models.densenet121(), f"{TORCHVISION} models.densenet121()"),
    "convnext_tiny": (lambda: tv_models.convnext_tiny(), f"{TORCHVISION} models.convnext_tiny()"),
    "vit_small": (lambda: timm.create_model("vit_small_patch16_224"),
                  f"{TIMM} create_model('vit_small_patch16_224')"),
}
VIT_48 = ("timm.create_model('vit_small_patch16_224', num_classes=10, img_size=48, "
          "dynamic_img_size=True)")
# (arch, reference source, our create_model options, input size, tolerance)
REFERENCE_CASES = [
    ("resnet18", "tv_models.resnet18(num_classes=10)", {}, 64, 1e-9),
    ("resnet50", "tv_models.resnet50(num_classes=10)", {}, 64, 1e-9),
    ("densenet121", "tv_models.densenet121(num_classes=10)", {}, 32, 1e-9),
    ("convnext_tiny", "tv_models.convnext_tiny(num_classes=10)", {}, 32, 1e-9),
    ("vit_small", VIT_48, {"img_size": 48}, 48, 1e-9),
    ("vit_small", VIT_48, {"img_size": 48}, 32, 1e-6),  # timm resizes pos_embed in float32
    ("vit_small", VIT_48, {"img_size": 48}, 64, 1e-6),
]


def write_key_lists():
    for arch, (build, source) in PUBLISHED.items():
        model = build()
        state_dict = model.state_dict()
        num_parameters = sum(p.numel() for p in model.parameters())
        lines = [f"# state_dict of {source}: key<TAB>shape (JSON), in state_dict order.",
                 f"# {len(state_dict)} entries; {num_parameters} parameters at 1000 classes."]
        lines += [f"{key}\t{json.dumps(list(value.shape))}" for key, value in state_dict.items()]
        (DATA_DIR / f"{arch}_keys.txt").write_text("\n".join(lines) + "\n")


def reference_logits(source, input_size):
    model = eval(source).double().eval()  # sources are the literals above
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    model.load_state_dict(deterministic_state_dict(shapes))
    with torch.no_grad():
        return model(deterministic_images(input_size)).tolist()


def write_reference_logits():
    cases = [{"arch": arch, "reference": source.replace("tv_models.", f"{TORCHVISION} models."),
              "num_classes": 10, "model_options": options, "input_size": input_size,
              "atol": tolerance, "logits": reference_logits(source, input_size)}
             for arch, source, options, input_size, tolerance in REFERENCE_CASES]
    about = (f"Logits of {TORCHVISION} / {TIMM} in float64, eval mode, for the weights of "
             "tests/deterministic_weights.py (deterministic_state_dict, deterministic_images).")
    (DATA_DIR / "model_reference_logits.json").write_text(
        json.dumps({"about": about, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    write_key_lists()
    write_reference_logits()
