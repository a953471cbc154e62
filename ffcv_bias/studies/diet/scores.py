"""Per-sample scores of one model: EL2N and GraNd (torch only here; imported lazily)."""
import numpy as np
from tqdm import tqdm

from ffcv_bias.studies.diet.common import DietError

# Per-sample gradients of one vmap chunk are all alive at once: chunk x parameters floats.
# The default chunk keeps them within 1 GiB on CPU, 1/8 of the free memory on a GPU (the
# rest is left to the chunk's activations).
CPU_GRAND_CHUNK_BYTES = 1 << 30
GPU_GRAND_CHUNK_FRACTION = 1 / 8


def classifier_parameter_names(model):
    """Names of the parameters of the model's last nn.Linear (its classifier)."""
    import torch
    last = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last = name
    if last is None:
        raise DietError(f"{type(model).__name__} has no nn.Linear layer: "
                        f"--grand-params last needs a linear classifier")
    return [f"{last}.{name}" for name, _ in model.get_submodule(last).named_parameters()]


def grand_parameter_names(model, grand_params):
    if grand_params == "last":
        return classifier_parameter_names(model)
    return [name for name, _ in model.named_parameters()]


def default_grand_chunk(model, parameter_names, batch_size, device="cpu"):
    """Images per vmap chunk so that their per-sample gradients fit the memory budget."""
    import torch
    device = torch.device(device)
    budget = CPU_GRAND_CHUNK_BYTES
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = int(free_bytes * GPU_GRAND_CHUNK_FRACTION)
    parameters = dict(model.named_parameters())
    floats_per_image = sum(parameters[name].numel() for name in parameter_names)
    return int(max(1, min(batch_size, budget // (4 * floats_per_image))))


def el2n_from_logits(logits, labels):
    """|| softmax(logits) - onehot(labels) ||_2 per row."""
    import torch
    probabilities = torch.softmax(logits.float(), dim=1)
    one_hot = torch.nn.functional.one_hot(labels, probabilities.shape[1]).to(probabilities)
    return (probabilities - one_hot).norm(dim=1)


def per_sample_scores(model, inputs, labels, parameter_names, chunk_size=None):
    """(EL2N [B], GraNd [B]) of a batch, for a model in eval mode.

    GraNd is the L2 norm of the gradient of each sample's own cross-entropy loss with
    respect to `parameter_names` (the other parameters and the buffers are constants).
    vmap runs the per-sample gradients `chunk_size` samples at a time; the norm is taken
    inside the vmapped function, so at most one chunk of gradients exists at once.
    """
    import torch
    from torch.func import functional_call, grad, vmap

    if model.training:
        raise DietError("per-sample scores need the model in eval mode (BatchNorm running "
                        "statistics): call model.eval()")
    names = set(parameter_names)
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    differentiated = {name: parameters[name] for name in parameter_names}
    constants = {name: p for name, p in parameters.items() if name not in names}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss_and_logits(params, image, label):
        logits = functional_call(model, ({**constants, **params}, buffers),
                                 (image.unsqueeze(0),))
        loss = torch.nn.functional.cross_entropy(logits, label.unsqueeze(0))
        return loss, logits.squeeze(0)

    def squared_norm_and_logits(params, image, label):
        gradients, logits = grad(loss_and_logits, has_aux=True)(params, image, label)
        squared = sum(g.pow(2).sum() for g in gradients.values())
        return squared, logits

    per_sample = vmap(squared_norm_and_logits, in_dims=(None, 0, 0), chunk_size=chunk_size)
    squared_norms, logits = per_sample(differentiated, inputs, labels)
    return el2n_from_logits(logits, labels), squared_norms.sqrt()


def score_dataset(model, loader, device, parameter_names, chunk_size, description="scoring"):
    """(EL2N, GraNd, labels) of every sample the loader yields, in its order (numpy)."""
    import torch
    from ffcv_bias.data.loaders import normalize

    el2n, grand, labels_seen = [], [], []
    for images, labels in tqdm(loader, desc=description, unit="batch", leave=False,
                               disable=None):
        # normalize returns a new tensor: the loader's reused image buffer is not kept.
        inputs = normalize(images, device, channels_last=False)
        with torch.no_grad():  # grad() inside still differentiates; no graph outside it
            batch_el2n, batch_grand = per_sample_scores(
                model, inputs, labels.to(device), parameter_names, chunk_size)
        el2n.append(batch_el2n.cpu().numpy())
        grand.append(batch_grand.cpu().numpy())
        labels_seen.append(labels.numpy().copy())
    return (np.concatenate(el2n).astype(np.float64), np.concatenate(grand).astype(np.float64),
            np.concatenate(labels_seen).astype(np.int64))


def build_model(nested, num_classes, weights_path, device, seed=None):
    """The run's architecture with its weights (or a seeded fresh init), eval mode."""
    from ffcv_bias.studies import trained
    state_dict = None if weights_path is None else trained.read_state_dict(weights_path)
    model = trained.build_model(nested["model"]["arch"], num_classes, state_dict,
                                **trained.model_options(nested), seed=seed,
                                source=f"weights {weights_path}")
    return model.to(device).eval()


def input_norms(loader, device):
    """|| x ||_2 of every image as the network sees it (normalized, whole image), in the
    loader's order: Kirsch (2023) found GraNd at initialisation tracks it (Spearman 0.96),
    so a score that ranks images like it says little beyond their pixels."""
    from ffcv_bias.data.loaders import normalize
    norms = []
    for images, _ in loader:
        inputs = normalize(images, device, channels_last=False)
        norms.append(inputs.flatten(1).double().norm(dim=1).cpu().numpy())
    return np.concatenate(norms).astype(np.float64)


def predict(model, loader, device):
    """(predicted class, label) of every image the loader yields, in its order."""
    import torch
    from ffcv_bias.data.loaders import normalize
    predictions, labels_seen = [], []
    with torch.no_grad():
        for images, labels in loader:
            logits = model(normalize(images, device, channels_last=False))
            predictions.append(logits.argmax(dim=1).cpu().numpy())
            labels_seen.append(labels.numpy().copy())
    return np.concatenate(predictions), np.concatenate(labels_seen).astype(np.int64)


def spearman_matrix(columns):
    """Spearman rank correlation [S, S] between the S columns of an [N, S] array: the
    Pearson correlation of their ranks (ties get their average rank, as scipy does)."""
    from scipy.stats import rankdata
    columns = np.asarray(columns, dtype=np.float64)
    ranks = np.column_stack([rankdata(columns[:, j]) for j in range(columns.shape[1])])
    centred = ranks - ranks.mean(axis=0)
    scale = np.sqrt((centred ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (centred.T @ centred) / np.outer(scale, scale)
