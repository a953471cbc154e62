"""augment.decode=fast: decode only the crop, at the coarsest DCT scale that still covers
the output, then resize the rest of the way.

The exact path (augment.decode=exact, ffcv's own way) decodes every pixel of the JPEG with
libjpeg-turbo, then resizes the crop with OpenCV's INTER_AREA. The fast path asks the small
C extension `ffcv_bias.data._fastjpeg` (libjpeg API: jpeg_crop_scanline + jpeg_skip_scanlines +
scale_denom) for the crop rectangle only, then runs the same INTER_AREA resize on it:

  - At DCT scale 1 (a crop smaller than twice the output side) the decoded pixels are the
    full decode's bit for bit (same IDCT, upsampling and colour conversion; the extension
    decodes a margin column so that subsampled chroma is upsampled as in the full image),
    so the output is identical to the exact path's.
  - When the crop is at least 2x (4x, 8x) the output on both sides, the IDCT itself outputs
    1/2 (1/4, 1/8) of the pixels; the crop rectangle is rounded to that grid (by at most
    half a decoded pixel, i.e. under half an output pixel), and INTER_AREA resizes the rest
    of the way. Only this resampling differs from the exact path.

Whatever the extension cannot decode exactly as the full decode would (CMYK/YCCK, a libjpeg
error or warning) is decoded the exact way instead, and counted per reason. Without the
extension (not built, libjpeg missing at run time, failed self-check) every image takes the
exact path and a warning says so, once per process.
"""
import ctypes
import warnings

import numpy as np
from numba import njit

from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler

from ffcv_bias.data.fastjpeg_file import fastjpeg_file

DECODE_MODES = ("exact", "fast")
# Index = the extension's return code (see _fastjpeg.c); 0 is success.
FALLBACK_REASONS = ("none", "libjpeg error", "colour space", "libjpeg warning", "region")
FAST_DECODED = 0
EXACT_DECODED = -1       # the path asked for was the exact one: not a fallback
_SCALE_DENOMINATORS = (8, 4, 2)

_library_state = {}      # "function" (ctypes function or None), "problem" (str), "warned",
                         # "path" (the extension's file, once loaded)


@njit(cache=False)
def scaled_crop(top, left, crop_h, crop_w, height, width, out_h, out_w):
    """(denominator, y0, y1, x0, x1): the DCT scale 1/denominator to decode at (the largest
    of 1/8, 1/4, 1/2 that keeps the crop at least the output size on both sides, else 1)
    and the crop's rows [y0, y1) and columns [x0, x1) in that scaled image, rounded to the
    nearest scaled pixel and kept inside it (libjpeg's scaled size is the ceiling)."""
    denominator = 1
    for candidate in _SCALE_DENOMINATORS:
        if crop_h >= candidate * out_h and crop_w >= candidate * out_w:
            denominator = candidate
            break
    half = denominator // 2
    scaled_h = (height + denominator - 1) // denominator
    scaled_w = (width + denominator - 1) // denominator
    y0 = min((top + half) // denominator, scaled_h - 1)
    x0 = min((left + half) // denominator, scaled_w - 1)
    y1 = max(y0 + 1, min((top + crop_h + half) // denominator, scaled_h))
    x1 = max(x0 + 1, min((left + crop_w + half) // denominator, scaled_w))
    return denominator, y0, y1, x0, x1


def _declare(function):
    function.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32,
                         ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
                         ctypes.c_uint64, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


def _self_check(function):
    """None if the extension decodes a test JPEG exactly as ffcv's full decode does, else
    what went wrong: a mismatched libjpeg would otherwise give wrong pixels silently."""
    import cv2
    rows, cols = np.mgrid[0:40, 0:56]
    image = np.stack([rows * 6, cols * 4, (rows * cols) % 251], axis=-1).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), 90])
    if not ok:
        return "cv2 could not encode the self-check image"
    blob = np.ascontiguousarray(encoded.reshape(-1))
    full = np.zeros(40 * 56 * 3, np.uint8)
    imdecode(blob, full, 40, 56, 40, 56, 0, 0, 1, 1, False, False)
    region = np.zeros_like(full)
    layout = np.zeros(3, np.int32)
    code = function(blob.ctypes.data, blob.size, 1, 9, 17, 20, 30, region.ctypes.data,
                    region.size, layout.ctypes.data)
    if code != FAST_DECODED:
        return f"self-check decode failed ({FALLBACK_REASONS[code]})"
    decoded_rows, row_width, column = (int(value) for value in layout)
    decoded = region[:decoded_rows * row_width * 3].reshape(decoded_rows, row_width, 3)
    if not np.array_equal(decoded[:, column:column + 30], full.reshape(40, 56, 3)[9:29, 17:47]):
        return "self-check: region pixels differ from the full decode"
    return None


def _load_library():
    try:
        path = fastjpeg_file()
        function = _declare(ctypes.CDLL(path).fastjpeg_decode_region)
        _library_state["path"] = path
    except (ImportError, OSError, AttributeError) as error:
        return None, (f"the extension ffcv_bias.data._fastjpeg is not available "
                      f"({type(error).__name__}: {error}); build it with `pip install -e .` "
                      f"(needs libjpeg's headers: libjpeg62-turbo-dev or conda libjpeg-turbo)")
    problem = _self_check(function)
    return (None, problem) if problem else (function, None)


def region_decoder():
    """The extension's ctypes function, or None (with the reason in `unavailable_reason`)."""
    if "function" not in _library_state:
        _library_state["function"], _library_state["problem"] = _load_library()
    return _library_state["function"]


def unavailable_reason():
    region_decoder()
    return _library_state["problem"]


def warn_unavailable_once():
    if not _library_state.get("warned"):
        _library_state["warned"] = True
        warnings.warn(f"augment.decode=fast: {unavailable_reason()}; decoding every image the "
                      f"exact way (full decode + INTER_AREA) instead", RuntimeWarning,
                      stacklevel=3)


def compile_crop_resizer(decode):
    """(compiled function, fast active?) for decode mode 'exact' or 'fast'.

    The function crop_resize(image_data, temp_buffer, height, width, top, left, crop_h,
    crop_w, destination) decodes the JPEG `image_data`, resizes rows [top, top + crop_h)
    and columns [left, left + crop_w) into `destination` (INTER_AREA) and returns
    FAST_DECODED, EXACT_DECODED, or the extension's reason (> 0) when the fast path was
    asked for but the image was decoded the exact way."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    imdecode_c = Compiler.compile(imdecode)
    resize_crop_c = Compiler.compile(resize_crop)

    def exact_crop_resize(image_data, temp_buffer, height, width, top, left, crop_h, crop_w,
                          destination):
        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                   False, False)
        image = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
        resize_crop_c(image, top, top + crop_h, left, left + crop_w, destination)
        return EXACT_DECODED

    region = region_decoder() if decode == "fast" else None
    if region is None:
        if decode == "fast":
            warn_unavailable_once()
        return Compiler.compile(exact_crop_resize), False
    exact_c = Compiler.compile(exact_crop_resize)

    def fast_crop_resize(image_data, temp_buffer, height, width, top, left, crop_h, crop_w,
                         destination):
        denominator, y0, y1, x0, x1 = scaled_crop(top, left, crop_h, crop_w, height, width,
                                                  destination.shape[0], destination.shape[1])
        layout = np.zeros(3, np.int32)
        code = region(image_data.ctypes.data, image_data.size, denominator, y0, x0, y1 - y0,
                      x1 - x0, temp_buffer.ctypes.data, temp_buffer.size, layout.ctypes.data)
        if code != FAST_DECODED:
            exact_c(image_data, temp_buffer, height, width, top, left, crop_h, crop_w,
                    destination)
            return code
        rows, row_width, column = layout[0], layout[1], layout[2]
        decoded = temp_buffer.reshape(-1)[:3 * rows * row_width].reshape(rows, row_width, 3)
        resize_crop_c(decoded, 0, rows, column, column + x1 - x0, destination)
        return FAST_DECODED

    return Compiler.compile(fast_crop_resize), True


@njit(cache=False)
def tally(statuses, counts, num_reasons):
    """Add the batch's fallbacks (statuses > 0, by reason) into `counts` (a pointer to
    `num_reasons` int64), serially: the decode loop runs in parallel threads, which must
    not increment shared counters."""
    for status in statuses:
        if 0 < status < num_reasons:
            counts[status] += 1
