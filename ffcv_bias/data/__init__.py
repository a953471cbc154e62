"""The data stage: image sources -> betons -> seeded batches. Files flow one way:

- `sources`      readers of each on-disk format -> datasets of (image, label); subsets
- `writer`       a dataset -> a .beton (ffcv's DatasetWriter, atomically) + its sidecar
- `sidecar`      the `.classes.json` beside each beton, and the checks that a beton is whole
- `fingerprint`  a cheap hash of a beton's tables: a finished run is never reused for
                 other data (config.json meta.betons)
- `augment`      the seeded random-resized-crop / centre-crop decoders (numba)
- `fast_decode`  the fused crop + DCT-scaled JPEG decode (`_fastjpeg.c`, libjpeg API)
- `fastjpeg_file` where that extension's file is (also a device bundle's, on sys.path)
- `loaders`      ffcv Loaders over a beton: the trainer's, the studies' and the analysis'
- `ffcv_patches` the places ffcv 1.0.2 itself is changed (loader threads, the writer's
                 watchdog), in one module to audit
- `ffcv_import`  ffcv imported without the numba compile of its image-mode table (~5 s of
                 CPU per process), installed here so it precedes every import of ffcv

Importing this package imports none of the others (nor torch, nor ffcv): each module is
imported by name.
"""

from ffcv_bias.data import ffcv_import as _ffcv_import  # noqa: E402

_ffcv_import.install()  # before anything imports ffcv: see ffcv_import.py
