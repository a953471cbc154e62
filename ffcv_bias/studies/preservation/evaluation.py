"""The study's passes over a beton: one compiled crop pipeline for every strength, and the
correct predictions per class for each (transform, setting, draw)."""
import numpy as np
import torch
from tqdm import tqdm

from ffcv_bias.data import ffcv_patches

ffcv_patches.apply()  # before any ffcv import: ffcv would pin torch to one thread

from ffcv.loader import Loader, OrderOption  # noqa: E402

from ffcv_bias.data.augment import SeededRandomResizedCropDecoder  # noqa: E402
from ffcv_bias.data.loaders import (SeededLoader, _image_tail, _label_pipeline,  # noqa: E402
                                    read_labels)
from ffcv_bias.studies.preservation.transforms import (  # noqa: E402
    _CUTOUT_DRAWS, _JITTER_DRAWS, IDENTITY, color_jitter, cutout, normalize_float,
    per_image_uniforms)
from ffcv_bias.studies.trained import StudyError  # noqa: E402


# ----------------------------------------------------------------------------------------
# The loader: one compiled pipeline for every crop strength
# ----------------------------------------------------------------------------------------

class CropLoader:
    """Sequential loader whose every image is a random-resized crop keeping exactly `alpha`
    of its area, alpha changeable between passes without recompiling.

    The seeded crop decoder reads per-sample lower bounds through their address at run
    time (data/augment.py); with the decoder's own max_scale at or below every alpha, the range
    of each sample is [alpha, alpha]. Writing alpha into that array (in place) between
    passes changes the crop; `set_draw(d)` sets the epoch of the (seed, epoch, index) hash.

    `device`: a CUDA device makes the pipelines copy each batch to the GPU themselves, on
    the batch slot's stream (ToDevice after ToTensor, as the trainer's loaders do: see
    data/loaders.py). A copy made later, non-blocking on the compute stream, would read
    ffcv's reused pinned buffer while the loader thread decodes a later batch into it.
    """

    def __init__(self, path, *, resolution, batch_size, seed, smallest_alpha, num_workers,
                 indices=None, device=None):
        num_samples = len(read_labels(path))
        self.bounds = np.ones(num_samples, dtype=np.float64)
        self.decoder = SeededRandomResizedCropDecoder(
            (resolution, resolution), seed=seed, min_scale=smallest_alpha,
            max_scale=smallest_alpha, flip=False, sample_min_scale=self.bounds)
        self.bounds = self.decoder.sample_min_scale   # the array the compiled code reads
        if device is not None and torch.device(device).type == "cuda" and \
                torch.device(device).index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # --device cuda
        pipelines = {"image": [self.decoder] + _image_tail(device),
                     "label": _label_pipeline(device)}
        loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                        order=OrderOption.SEQUENTIAL, os_cache=True, drop_last=False,
                        indices=None if indices is None else np.asarray(indices),
                        pipelines=pipelines)
        self.loader = SeededLoader(loader, crop_decoder=self.decoder)
        self.order = self.loader.sample_order()

    def set_alpha(self, alpha):
        self.bounds[:] = float(alpha)

    def set_draw(self, draw):
        self.loader.set_epoch(draw)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        """(uint8 images, labels, dataset indices) per batch, on the loader's device; images
        are reused buffers."""
        start = 0
        for images, labels in self.loader:
            stop = start + len(labels)
            yield images, labels, self.order[start:stop]
            start = stop


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

class Tally:
    """Correct predictions per class for each (transform, setting, draw)."""

    def __init__(self, num_classes, device):
        self.num_classes, self.device = num_classes, device
        self.hits = {}
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def add(self, key, logits, labels):
        correct = labels[logits.argmax(dim=1) == labels]
        hits = torch.bincount(correct, minlength=self.num_classes)
        self.hits[key] = self.hits.get(key, 0) + hits

    def count(self, labels):
        self.counts += torch.bincount(labels, minlength=self.num_classes)

    def per_class(self, key):
        counts = self.counts.double().cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.hits[key].double().cpu().numpy() / counts

    def top1(self, key):
        return float(self.hits[key].sum()) / float(self.counts.sum())


def whole_image_pass(model, loader, tally, autocast, settings, draws, seed, device, progress):
    """Identity, cutout and jitter, all from one decode of each whole image."""
    loader.set_alpha(1.0)
    loader.set_draw(0)
    cutouts = [s for s in settings.get("cutout", ()) if s != IDENTITY["cutout"]]
    jitters = [s for s in settings.get("jitter", ()) if s != IDENTITY["jitter"]]
    with torch.inference_mode(), autocast():
        for images, labels, indices in loader:
            # Already on `device` (the pipeline copied them): no copy here.
            labels = labels.to(device)
            raw = images.to(device).float()
            clean = normalize_float(raw)
            tally.count(labels)
            tally.add(("identity", None, 0), model(clean), labels)
            for draw in range(draws):
                if cutouts:
                    positions = per_image_uniforms(seed, draw, indices, _CUTOUT_DRAWS, 2,
                                                   device)
                    for side in cutouts:
                        tally.add(("cutout", side, draw),
                                  model(cutout(clean, side, positions)), labels)
                if jitters:
                    factors = per_image_uniforms(seed, draw, indices, _JITTER_DRAWS, 3, device)
                    for strength in jitters:
                        jittered = normalize_float(color_jitter(raw, strength, factors))
                        tally.add(("jitter", strength, draw), model(jittered), labels)
            progress.update(1)


def crop_passes(model, loader, tally, autocast, alphas, draws, device, progress):
    """One pass over the data per (alpha < 1, draw)."""
    for alpha in alphas:
        if alpha == IDENTITY["crop"]:
            continue
        loader.set_alpha(alpha)
        for draw in range(draws):
            loader.set_draw(draw)
            with torch.inference_mode(), autocast():
                for images, labels, _ in loader:
                    labels = labels.to(device)
                    inputs = normalize_float(images.to(device).float())
                    tally.add(("crop", alpha, draw), model(inputs), labels)
                    progress.update(1)


def evaluate_split(model, path, *, split, settings, draws, seed, resolution, batch_size,
                   num_workers, device, autocast, num_classes, indices=None):
    """Tally of one dataset (split) under every transform and strength."""
    alphas = settings.get("crop", ())
    smallest = min([a for a in alphas] + [1.0])
    loader = CropLoader(path, resolution=resolution, batch_size=batch_size, seed=seed,
                        smallest_alpha=smallest, num_workers=num_workers, indices=indices,
                        device=device)
    tally = Tally(num_classes, device)
    crop_count = sum(1 for a in alphas if a != IDENTITY["crop"])
    total = len(loader) * (1 + crop_count * draws)
    with tqdm(total=total, desc=f"{split}: transforms", unit="batch", disable=None) as bar:
        whole_image_pass(model, loader, tally, autocast, settings, draws, seed, device, bar)
        crop_passes(model, loader, tally, autocast, alphas, draws, device, bar)
    labels_seen = tally.counts.cpu().numpy()
    if labels_seen.sum() == 0:
        raise StudyError(f"{path} has no images")
    return tally
