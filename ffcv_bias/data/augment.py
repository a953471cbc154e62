"""Seeded, numba-JIT random-resized-crop + flip decoder for FFCV RGB images.

Why not ffcv's RandomResizedCropRGBImageDecoder: it draws crops from numba's global RNG,
which nothing seeds, so two runs with the same seed see different crops and a run is not
reproducible. Here the crop and the flip of sample `i` in epoch `e` of a run with seed `s`
are a pure function of (s, e, i): a counter-based hash (splitmix64), not a stream. The
result is the same whatever the worker count, batch size, batch order or resume point.

How the epoch reaches the compiled code: numba freezes what a closure captures, so
a Python int or array captured by `decode` could not change after compilation. The decoder
owns a small int64 "live state" array [seed, epoch] and the compiled code captures only its
*address*, reading the current values through a pointer on every call (`_int64_at`).
`SeededRandomResizedCropDecoder.set_epoch(e)` writes the epoch; the next batch sees it.
Cost: two memory loads per sample. The per-sample crop lower bounds (class-conditional
crop) are read the same way, so a 1.28M-entry array is not baked into the LLVM module.

Crop sampling follows torchvision's RandomResizedCrop: up to 10 tries of an area fraction
uniform in [min_scale, max_scale] and a log-uniform aspect ratio, accepted when the crop
fits. Where torchvision then falls back to the whole image (area 1.0, outside the requested
range when max_scale < 1), we fall back to the last area fraction drawn with the aspect
ratio clamped so the crop fits: the area fraction always stays within [min_scale, max_scale].

Decoding (`decode`, config key augment.decode): 'exact' decodes the whole JPEG, then resizes
the crop (INTER_AREA), as ffcv does; 'fast' decodes only the crop, DCT-scaled when it is at
least twice the output (ffcv_bias/data/fast_decode.py). The crop rectangle is the same in both.
`CenterCropDecoder` is the validation decoder (ffcv's centre crop) with the same choice.
"""
import heapq
import weakref

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_center_crop
from ffcv.libffcv import resize_crop
from ffcv.pipeline.compiler import Compiler

from ffcv_bias.data import fast_decode

# Number of 64-bit draws per sample: 2 per crop try (area, aspect) x 10 tries,
# 2 for the position, 1 for the flip. Each has its own counter, so changing one
# never shifts another.
_MAX_CROP_TRIES = 10
_DRAW_POSITION = 2 * _MAX_CROP_TRIES
_DRAW_FLIP = _DRAW_POSITION + 2

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_STREAM_SALT = _U64(0x5EED5EED5EED5EED)


@njit(cache=False)
def splitmix64(value):
    """The splitmix64 finalizer: a bijective, well-mixed 64-bit hash."""
    z = value + _GOLDEN
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


@njit(cache=False)
def sample_key(seed, epoch, index):
    """The per-(seed, epoch, sample) key all of a sample's draws derive from."""
    key = splitmix64(_U64(seed) ^ _STREAM_SALT)
    key = splitmix64(key ^ _U64(epoch))
    return splitmix64(key ^ _U64(index))


@njit(cache=False)
def uniform(key, draw):
    """The `draw`-th uniform float in [0, 1) of a sample (53 random bits)."""
    bits = splitmix64(key ^ (_U64(draw + 1) * _GOLDEN))
    return np.float64(bits >> _U64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=False)
def sample_crop(seed, epoch, index, height, width, min_scale, max_scale,
                log_ratio_low, log_ratio_high):
    """(top, left, crop_height, crop_width, flip) of one sample: pure function of its inputs."""
    key = sample_key(seed, epoch, index)
    area = np.float64(height) * np.float64(width)
    scale = min_scale
    aspect = 1.0
    found = False
    for attempt in range(_MAX_CROP_TRIES):
        scale = min_scale + (max_scale - min_scale) * uniform(key, 2 * attempt)
        aspect = np.exp(log_ratio_low + (log_ratio_high - log_ratio_low)
                        * uniform(key, 2 * attempt + 1))
        crop_w = int(round(np.sqrt(area * scale * aspect)))
        crop_h = int(round(np.sqrt(area * scale / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            found = True
            break
    if not found:
        # Keep the drawn area; clamp the aspect ratio into the range where the crop fits.
        target = area * scale
        aspect = min(max(aspect, target / (np.float64(height) ** 2)),
                     (np.float64(width) ** 2) / target)
        crop_w = min(width, max(1, int(round(np.sqrt(target * aspect)))))
        crop_h = min(height, max(1, int(round(np.sqrt(target / aspect)))))
    top = int(uniform(key, _DRAW_POSITION) * (height - crop_h + 1))
    left = int(uniform(key, _DRAW_POSITION + 1) * (width - crop_w + 1))
    flip = uniform(key, _DRAW_FLIP) < 0.5
    return top, left, crop_h, crop_w, flip


def _pointer_from_address(element_type):
    """An intrinsic turning an integer address into a raw `element_type*` (no copy)."""
    pointer_type = types.CPointer(element_type)

    @intrinsic
    def pointer_at(typingctx, address):
        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(pointer_type))

        return pointer_type(types.intp), codegen

    return pointer_at


# The live-state array [seed, epoch] and the per-sample lower bounds, read by address.
_int64_at = _pointer_from_address(types.int64)
_float64_at = _pointer_from_address(types.float64)


@njit(cache=False)
def flip_columns(image):
    """Mirror an HxWxC image left-right, in place."""
    width = image.shape[1]
    for row in range(image.shape[0]):
        for col in range(width // 2):
            for channel in range(image.shape[2]):
                swap = image[row, col, channel]
                image[row, col, channel] = image[row, width - 1 - col, channel]
                image[row, width - 1 - col, channel] = swap


def per_sample_min_scale(labels, class_min_scale):
    """Look up each sample's crop lower bound through its label."""
    class_min_scale = np.asarray(class_min_scale, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_min_scale)):
        raise ValueError(f"class_min_scale has {len(class_min_scale)} entries but labels "
                         f"go up to {labels.max()}")
    return np.ascontiguousarray(class_min_scale[labels])


class FixedRows:
    """Rows of int64 at addresses that stay the same from one loader to the next.

    The compiled decoders read their live state and add their fallback counts through an
    address, which numba freezes into the code as a constant. An owner (a decoder, a
    counter) takes the lowest free row and gives it back when it is collected, so the next
    loader's decoder gets the address the previous one had, the same closure, and (ffcv's
    Compiler memoised, data/ffcv_patches.py patch 9) the code already compiled. Past
    `rows` owners at once, an owner gets an array of its own (correct, compiled anew)."""

    def __init__(self, width, rows=64):
        self.table = np.zeros((rows, width), dtype=np.int64)
        self.free = list(range(rows))   # a heap: the lowest free row first

    def take(self, owner):
        if not self.free:
            return np.zeros(self.table.shape[1], dtype=np.int64)
        row = heapq.heappop(self.free)
        self.table[row] = 0
        weakref.finalize(owner, heapq.heappush, self.free, row)
        return self.table[row]


_LIVE_STATE_ROWS = FixedRows(2)                                   # [seed, epoch]
_FALLBACK_ROWS = FixedRows(len(fast_decode.FALLBACK_REASONS))
# Every sample at the decoder's min_scale (no per-sample bound): one array for all of them.
_NO_SAMPLE_BOUNDS = np.full(1, -1.0)
_NO_SAMPLE_BOUNDS.flags.writeable = False


class FallbackCounter:
    """Images the fast path handed to the exact one, per reason (fast_decode.FALLBACK_REASONS).

    The compiled decoder adds to `counts` through its address (like the live state above),
    so the numbers are current after every batch."""

    def __init__(self, decode):
        if decode not in fast_decode.DECODE_MODES:
            raise ValueError(f"decode must be one of {fast_decode.DECODE_MODES}, "
                             f"got {decode!r}")
        self.decode = decode
        self.fast_active = False  # set when the code is generated (False: exact everywhere)
        self.counts = _FALLBACK_ROWS.take(self)

    @property
    def fallbacks(self):
        """{reason: images} of the fallbacks so far (empty when there were none)."""
        return {reason: int(count) for reason, count
                in zip(fast_decode.FALLBACK_REASONS, self.counts) if count}


def compile_crop_decoder(fallback):
    """decode_crop(image_data, temp_buffer, mode, height, width, top, left, crop_h, crop_w,
    destination) -> status, compiled, for both decoders below: a JPEG field is decoded the
    `fallback.decode` way (exact or fast; status as fast_decode.compile_crop_resizer's), a
    raw RGB field is cropped and resized as stored (status 0: nothing to count). Sets
    `fallback.fast_active`."""
    crop_resize_c, fallback.fast_active = fast_decode.compile_crop_resizer(fallback.decode)
    resize_crop_c = Compiler.compile(resize_crop)
    jpg = IMAGE_MODES["jpg"]

    def decode_crop(image_data, temp_buffer, mode, height, width, top, left, crop_h, crop_w,
                    destination):
        if mode == jpg:
            return crop_resize_c(image_data, temp_buffer, height, width, top, left, crop_h,
                                 crop_w, destination)
        resize_crop_c(image_data.reshape(height, width, 3), top, top + crop_h, left,
                      left + crop_w, destination)
        return 0

    return Compiler.compile(decode_crop)


def validate_scale(min_scale, max_scale):
    if not 0.0 < min_scale <= max_scale <= 1.0:
        raise ValueError(f"crop scale must satisfy 0 < min_scale <= max_scale <= 1, "
                         f"got min_scale={min_scale}, max_scale={max_scale}")


class SeededRandomResizedCropDecoder(ResizedCropRGBImageDecoder):
    """Random-resized-crop + horizontal flip, seeded per (seed, epoch, sample index).

    Parameters
    ----------
    output_size : (int, int)     resolution of the output; may change between epochs
                                  (progressive resizing) without recompiling.
    seed : int                   the run seed.
    min_scale, max_scale : float area fraction of the crop, tau = min_scale.
    ratio : (float, float)       aspect-ratio range (log-uniform).
    flip : bool                  random horizontal flip with probability 1/2.
    sample_min_scale : array or None
        Lower bound per *sample* (use `per_sample_min_scale(labels, class_bounds)` for the
        class-conditional crop). A sample with bound 1.0 is never cropped. When given,
        each sample's range is [sample_min_scale[i], max(max_scale, sample_min_scale[i])].
    decode : 'exact' or 'fast'    how the JPEG is decoded (module docstring); the fast
                                  path's fallbacks are counted in `self.fallback`.
    """

    def __init__(self, output_size, seed, min_scale=0.08, max_scale=1.0,
                 ratio=(3 / 4, 4 / 3), flip=True, sample_min_scale=None, decode="exact"):
        super().__init__(output_size)
        self.fallback = FallbackCounter(decode)
        validate_scale(min_scale, max_scale)
        self.scale = (float(min_scale), float(max_scale))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = bool(flip)
        # [seed, epoch]: read by the compiled code through its address, so it stays live.
        self.live_state = _LIVE_STATE_ROWS.take(self)
        self.live_state[0] = int(seed)
        if sample_min_scale is None:
            self.sample_min_scale = _NO_SAMPLE_BOUNDS  # -1: use min_scale for every sample
        else:
            bounds = np.ascontiguousarray(sample_min_scale, dtype=np.float64)
            if bounds.size and not (np.all(bounds > 0) and np.all(bounds <= 1)):
                raise ValueError("per-sample crop lower bounds must lie in (0, 1]")
            self.sample_min_scale = bounds

    def set_epoch(self, epoch):
        self.live_state[1] = int(epoch)

    @property
    def get_crop_generator(self):  # required by the abstract base; crops come from sample_crop
        return sample_crop

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        decode_crop = compile_crop_decoder(self.fallback)
        tally = fast_decode.tally
        state_address = self.live_state.ctypes.data
        bounds_address = self.sample_min_scale.ctypes.data
        counts_address = self.fallback.counts.ctypes.data
        num_reasons = len(self.fallback.counts)
        per_sample = bool(self.sample_min_scale[0] >= 0)
        min_scale, max_scale = self.scale
        log_ratio_low, log_ratio_high = np.log(self.ratio[0]), np.log(self.ratio[1])
        do_flip = self.flip

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            state = _int64_at(state_address)
            seed, epoch = state[0], state[1]
            bounds = _float64_at(bounds_address)
            statuses = np.zeros(len(batch_indices), np.int64)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field['data_ptr'], storage_state)
                height = np.uint32(field['height'])
                width = np.uint32(field['width'])
                low, high = min_scale, max_scale
                if per_sample:
                    low = bounds[source_ix]
                    high = max(max_scale, low)
                top, left, crop_h, crop_w, flip = sample_crop(
                    seed, epoch, source_ix, height, width, low, high,
                    log_ratio_low, log_ratio_high)
                statuses[dst_ix] = decode_crop(image_data, temp_storage[dst_ix], field['mode'],
                                               height, width, top, left, crop_h, crop_w,
                                               destination[dst_ix])
                if do_flip and flip:
                    flip_columns(destination[dst_ix])
            tally(statuses, _int64_at(counts_address), num_reasons)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class CenterCropDecoder(ResizedCropRGBImageDecoder):
    """ffcv's CenterCropRGBImageDecoder (the centre square of `ratio` x the short side,
    resized to `output_size`), decoded the `decode` way ('exact' or 'fast'). With 'fast'
    the rows and columns outside the centre crop are not decoded, and a crop at least twice
    the output side is decoded DCT-scaled; fallbacks are counted in `self.fallback`."""

    def __init__(self, output_size, ratio, decode="exact"):
        super().__init__(output_size)
        self.ratio = float(ratio)
        self.fallback = FallbackCounter(decode)

    @property
    def get_crop_generator(self):  # required by the abstract base
        return get_center_crop

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        decode_crop = compile_crop_decoder(self.fallback)
        center_crop = Compiler.compile(get_center_crop)
        tally = fast_decode.tally
        counts_address = self.fallback.counts.ctypes.data
        num_reasons = len(self.fallback.counts)
        ratio = self.ratio

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            statuses = np.zeros(len(batch_indices), np.int64)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field['data_ptr'], storage_state)
                height = np.uint32(field['height'])
                width = np.uint32(field['width'])
                top, left, crop_h, crop_w = center_crop(height, width, None, ratio)
                statuses[dst_ix] = decode_crop(image_data, temp_storage[dst_ix], field['mode'],
                                               height, width, top, left, crop_h, crop_w,
                                               destination[dst_ix])
            tally(statuses, _int64_at(counts_address), num_reasons)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
