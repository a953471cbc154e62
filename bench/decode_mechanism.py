"""Which mechanism decodes a crop fastest, per image on one thread: the measurement that
chose the fast decoder's design (BENCHMARKS.md, "Fast decoding: the mechanism").

    python bench/decode_mechanism.py                 # 40 images, 5 rounds
    python bench/decode_mechanism.py --images 4 --rounds 1    # a quick check

Three ways to get the INTER_AREA-resized crop of a JPEG, all on the same bytes:

  exact        ffcv's libffcv imdecode of the full image (tjDecompress2, FASTDCT), then
               resize_crop of the crop: what augment.decode=exact does.
  tjTransform  libffcv imdecode with its crop and scale arguments: tjTransform(TJXOPT_CROP)
               transcodes the MCU-aligned crop losslessly into a new JPEG, then
               tjDecompress2 decodes it DCT-scaled; then resize_crop of the exact crop.
  libjpeg      ffcv_bias.data._fastjpeg: jpeg_crop_scanline + jpeg_skip_scanlines + scale_denom
               (augment.decode=fast), then resize_crop.

Images: the loader benchmark's synthetic photo-like images resized to 500x375 and encoded
by OpenCV at quality 90 (what ffcv's writer stores). Crops: centred, of area fraction 1.0,
0.35 and 0.08 (aspect as square as fits); output 160 px. The DCT scale is the fast path's
rule (the largest of 1/2, 1/4, 1/8 that keeps the crop >= the output) for both tjTransform
and libjpeg. Figures: median over the rounds of the process CPU time per image.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import positive_int, synthetic_image  # noqa: E402

from ffcv.libffcv import imdecode, resize_crop  # noqa: E402

from ffcv_bias.data import fast_decode  # noqa: E402

HEIGHT, WIDTH, OUTPUT = 375, 500, 160


def encoded_images(count):
    blobs = []
    for index in range(count):
        image = np.asarray(synthetic_image(0, index, 512).resize((WIDTH, HEIGHT)))
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                   [int(cv2.IMWRITE_JPEG_QUALITY), 90])
        assert ok
        blobs.append(encoded.reshape(-1))
    return blobs


def centred_crop(fraction):
    side = int(round(np.sqrt(HEIGHT * WIDTH * fraction)))
    crop_h = min(side, HEIGHT)
    crop_w = min(WIDTH, int(round(HEIGHT * WIDTH * fraction / crop_h)))
    return (HEIGHT - crop_h) // 2, (WIDTH - crop_w) // 2, crop_h, crop_w


class Decoders:
    def __init__(self):
        self.buffer = np.empty(HEIGHT * WIDTH * 3, np.uint8)
        self.output = np.empty((OUTPUT, OUTPUT, 3), np.uint8)
        self.layout = np.zeros(3, np.int32)
        self.region = fast_decode.region_decoder()
        if self.region is None:
            sys.exit(f"error: {fast_decode.unavailable_reason()}")

    def exact(self, blob, top, left, crop_h, crop_w):
        imdecode(blob, self.buffer, HEIGHT, WIDTH, HEIGHT, WIDTH, 0, 0, 1, 1, False, False)
        resize_crop(self.buffer.reshape(HEIGHT, WIDTH, 3), top, top + crop_h, left,
                    left + crop_w, self.output)

    def tjtransform(self, blob, top, left, crop_h, crop_w):
        denominator = fast_decode.scaled_crop(top, left, crop_h, crop_w, HEIGHT, WIDTH,
                                              OUTPUT, OUTPUT)[0]
        y0, x0 = top // 16 * 16, left // 16 * 16   # tjTransform crops on the MCU grid
        height, width = top + crop_h - y0, left + crop_w - x0
        imdecode(blob, self.buffer, HEIGHT, WIDTH, height, width, x0, y0, 1, denominator,
                 True, False)
        rows, cols = -(-height // denominator), -(-width // denominator)
        resize_crop(self.buffer[:rows * cols * 3].reshape(rows, cols, 3),
                    (top - y0) // denominator, (top - y0 + crop_h) // denominator,
                    (left - x0) // denominator, (left - x0 + crop_w) // denominator,
                    self.output)

    def libjpeg(self, blob, top, left, crop_h, crop_w):
        denominator, y0, y1, x0, x1 = fast_decode.scaled_crop(top, left, crop_h, crop_w,
                                                              HEIGHT, WIDTH, OUTPUT, OUTPUT)
        code = self.region(blob.ctypes.data, blob.size, denominator, y0, x0, y1 - y0, x1 - x0,
                           self.buffer.ctypes.data, self.buffer.size, self.layout.ctypes.data)
        if code != fast_decode.FAST_DECODED:
            raise RuntimeError(f"region decode failed: {fast_decode.FALLBACK_REASONS[code]}")
        rows, row_width, column = (int(value) for value in self.layout)
        resize_crop(self.buffer[:rows * row_width * 3].reshape(rows, row_width, 3), 0, rows,
                    column, column + x1 - x0, self.output)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=positive_int, default=40)
    parser.add_argument("--rounds", type=positive_int, default=5)
    args = parser.parse_args(argv)
    blobs, decoders = encoded_images(args.images), Decoders()
    mechanisms = {"exact": decoders.exact, "tjTransform": decoders.tjtransform,
                  "libjpeg": decoders.libjpeg}
    print(f"{args.images} JPEGs {WIDTH}x{HEIGHT} (OpenCV, quality 90), output {OUTPUT} px, "
          f"{args.rounds} rounds; ms of CPU per image (median of rounds)")
    print(f"{'crop (area)':>16} {'scale':>5} " + " ".join(f"{name:>11}" for name in mechanisms))
    for fraction in (1.0, 0.35, 0.08):
        crop = centred_crop(fraction)
        times = {name: [] for name in mechanisms}
        for _ in range(args.rounds):
            for name, mechanism in mechanisms.items():   # interleaved, round by round
                started = time.process_time()
                for blob in blobs:
                    mechanism(blob, *crop)
                times[name].append((time.process_time() - started) / len(blobs) * 1e3)
        denominator = fast_decode.scaled_crop(*crop, HEIGHT, WIDTH, OUTPUT, OUTPUT)[0]
        label = f"{crop[2]}x{crop[3]} ({fraction:g})"
        print(f"{label:>16} {'1/' + str(denominator):>5} "
              + " ".join(f"{statistics.median(values):>11.3f}" for values in times.values()))


if __name__ == "__main__":
    main()
