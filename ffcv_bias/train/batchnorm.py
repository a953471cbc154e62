"""BatchNorm running statistics that match the final weights.

A BatchNorm layer evaluates with running averages of its batch statistics (momentum 0.1:
a memory of ~10 steps). When the weights moved fast until late in training (a run of a few
dozen steps, or one that blew up during a short warm-up), those averages describe earlier
weights, and the evaluated network is not the trained one: a 2-epoch run of the CPU
config on 2,000 images predicted one class for every image (12% top-1) although the same
weights with batch statistics scored 44-57% (see README, "Short runs").

`recompute_bn_statistics` replaces the running averages by exact averages over training
batches under the final weights (torch.optim.swa_utils.update_bn's method; Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021, call it PreciseBN). `bn_mismatch` measures how
far apart the two evaluations are, on training images, without changing the model.
"""
import copy

import torch

BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)


def batchnorm_layers(model):
    return [module for module in model.modules() if isinstance(module, BN_TYPES)]


def recompute_bn_statistics(model, batches, all_reduce=None):
    """Set every BatchNorm's running mean / var to the exact average over `batches`
    (an iterable of normalized input tensors) under the current weights. Returns the
    number of batches used (0: the model has no BatchNorm, nothing done).

    The average is BatchNorm's cumulative one (momentum None): the mean of the batches'
    means and the mean of their (unbiased) variances. `all_reduce` (a function summing a
    tensor in place across ranks, e.g. distributed.all_reduce) makes it the average over
    every rank's batches: each rank recomputes on its own shard, then the per-rank averages
    are summed weighted by their batch counts and divided by the total count, the same
    statistics one process would compute over all the ranks' batches (the order of the
    sum aside), on every rank."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None   # None = cumulative average over the batches seen
    model.train()
    count = 0
    with torch.no_grad():
        for inputs in batches:
            model(inputs)
            count += 1
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.train(was_training)
    if all_reduce is not None:
        _combine_across_ranks([layer for layer in layers if layer.track_running_stats],
                              count, all_reduce)
    return count


def _combine_across_ranks(layers, count, all_reduce):
    """Every layer's running statistics := the batch-count-weighted average of the ranks'
    (one all-reduce of all layers, in float64). A rank with no batch weighs nothing."""
    if not layers:
        return
    device = layers[0].running_mean.device
    pieces = [torch.tensor([float(count)], dtype=torch.float64, device=device)]
    for layer in layers:
        pieces += [layer.running_mean.double() * count, layer.running_var.double() * count]
    flat = all_reduce(torch.cat(pieces))
    total = flat[0]
    offset = 1
    with torch.no_grad():
        for layer in layers:
            size = layer.running_mean.numel()
            mean_sum = flat[offset:offset + size]
            var_sum = flat[offset + size:offset + 2 * size]
            offset += 2 * size
            layer.running_mean.copy_(mean_sum / total)
            layer.running_var.copy_(var_sum / total)
            # Batches seen over all ranks (on the device: reading the total would wait for
            # the GPU).
            layer.num_batches_tracked.copy_(total.to(layer.num_batches_tracked.dtype))


def bn_mismatch(model, batches_with_labels):
    """(top-1 with the running statistics, top-1 with statistics recomputed on the same
    images) on `batches_with_labels` [(inputs, labels)], on a copy of the model."""
    pairs = [(inputs, labels) for inputs, labels in batches_with_labels]
    fresh = copy.deepcopy(model)
    recompute_bn_statistics(fresh, (inputs for inputs, _ in pairs))
    return _top1(model, pairs), _top1(fresh, pairs)


def _top1(model, pairs):
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in pairs:
            correct += int((model(inputs).argmax(dim=1) == labels.to(inputs.device)).sum())
            total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)
