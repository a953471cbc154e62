"""Shared pieces of the data-diet study: its error types, argument parsing, the trainer's
config resolution and the score directory's reader (see cli.py for the commands)."""
import json
import re
from pathlib import Path

import numpy as np

from ffcv_bias.common import atomic
from ffcv_bias.common.errors import EXIT_FAILURE, UserError
from ffcv_bias.train.fastargs_strict import ConfigError

# Scores a score directory can hold (el2n_init / grand_init only with --also-init;
# input_norm since the input-norm baseline exists), then the policies prune offers.
SCORE_NAMES = ("el2n", "grand", "random", "input_norm", "el2n_init", "grand_init")
CLASS_QUOTA = "class-quota"
# DRoP with each class's error rate estimated by Laplace's rule, (errors + 1) / (n + 2):
# a class without error on a small split no longer weighs exactly 0.
CLASS_QUOTA_LAPLACE = "class-quota-laplace"
QUOTA_POLICIES = (CLASS_QUOTA, CLASS_QUOTA_LAPLACE)
PRUNE_CHOICES = SCORE_NAMES + QUOTA_POLICIES
GRAND_PARAMS = ("all", "last")


class DietError(UserError):
    """Bad input or a failed step; the message is one line naming the problem (exit 2)."""


class TrainingFailed(DietError):
    """A score run's trainer exited with an error (exit status 1)."""
    exit_code = EXIT_FAILURE


def parse_seeds(text):
    """'10' -> [0..9]; '0,3,7' -> [0, 3, 7]."""
    text = str(text).strip()
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return list(range(count))
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DietError(f"--seeds must be a count >= 1 or a list like 0,3,7, not {text!r}")
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise DietError(f"--seeds must list distinct non-negative seeds, not {text!r}")
    return seeds


def parse_overrides(extra_args):
    """['--a.b=v', ...] -> {'a.b': 'v'} (order kept); anything else is an error."""
    overrides = {}
    for arg in extra_args:
        match = re.fullmatch(r"--([A-Za-z_]\w*\.[A-Za-z_]\w*)=(.*)", arg, flags=re.S)
        if not match:
            raise DietError(f"unexpected argument '{arg}' (trainer overrides are written "
                            f"--section.key=value)")
        overrides[match.group(1)] = match.group(2)
    return overrides


def trainer_args(config_files, overrides):
    args = []
    for path in config_files:
        args += ["--config-file", str(Path(path).resolve())]
    return args + [f"--{key}={value}" for key, value in overrides.items()]


def resolve_trainer_config(args, check_files=True):
    """The trainer's nested config for `args` (its own parser and, optionally, checks)."""
    from ffcv_bias.train.checks import validate_semantics
    from ffcv_bias.train.config import resolve_config
    try:
        nested = resolve_config(list(args))
        if check_files:
            validate_semantics(nested)
    except ConfigError as error:
        raise DietError(f"trainer config: {error}") from None
    return nested


def _save_npz(path, **arrays):
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # a file object: np.savez would add ".npz" to a name
            np.savez(handle, **arrays)


def load_scores(scores_dir):
    """(arrays of scores.npz as a dict, scores.json) of a score directory."""
    scores_dir = Path(scores_dir)
    if scores_dir.is_file():
        raise DietError(f"--scores {scores_dir} is a file: give the score directory "
                        f"(e.g. {scores_dir.parent})")
    meta_path, npz_path = scores_dir / "scores.json", scores_dir / "scores.npz"
    if not meta_path.is_file() or not npz_path.is_file():
        raise DietError(f"{scores_dir} holds no scores (scores.json and scores.npz): run "
                        f"`python -m ffcv_bias.studies.diet score ... --out {scores_dir}`")
    with np.load(npz_path) as content:
        arrays = {name: content[name] for name in content.files}
    return arrays, json.loads(meta_path.read_text())


def format_sparsity(sparsity):
    return f"{sparsity:g}"
