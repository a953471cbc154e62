"""The optimizer a run trains with, over the weight-decay groups of param_groups.py."""
import torch

from ffcv_bias.train.fastargs_strict import ConfigError


def build_optimizer(name, groups, training):
    """The optimizer over weight-decay `groups`, with lr 0: the trainer sets lr at every
    step from the precomputed schedule. `training` is the config's training section.

    adamw is torch's AdamW: decoupled weight decay, each step shrinking the weights by
    lr * weight_decay (the convention of the ConvNeXt and DeiT recipes, whose 0.05 assumes
    it), applied only to the "decay" group.

    training.fused_optimizer=1 asks torch for its fused kernel (one launch for all
    parameters instead of a loop of small ones: the GPU lever); the default 0 keeps
    the for-each implementation the finished runs used (fused rounds differently). With
    training.amp_dtype=fp16 on CUDA the trainer asks for the fused kernel whatever this key
    says: GradScaler skips a step inside it, where the for-each one would make scaler.step
    read the inf check on the host at every step."""
    fused = {"fused": True} if training.get("fused_optimizer", 0) else {}
    try:
        if name == "sgd":
            return torch.optim.SGD(groups, lr=0.0, momentum=training["momentum"],
                                   nesterov=bool(training["nesterov"]), **fused)
        if name == "adamw":
            return torch.optim.AdamW(groups, lr=0.0, eps=training["adam_eps"],
                                     betas=(training["adam_beta1"], training["adam_beta2"]),
                                     **fused)
    except (RuntimeError, ValueError) as error:
        if fused:
            raise ConfigError(f"training.fused_optimizer=1: torch {torch.__version__} has "
                              f"no fused {name} for these parameters: {error}") from None
        raise
    raise ConfigError(f"training.optimizer: unknown optimizer {name!r}")
