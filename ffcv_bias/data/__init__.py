"""The data stage: image sources -> betons -> seeded batches. Files flow one way:

- `sources`      readers of each on-disk format -> datasets of (image, label); subsets
- `writer`       a dataset -> a .beton (ffcv's DatasetWriter, atomically) + its sidecar
- `sidecar`      the `.classes.json` beside each beton, and the checks that a beton is whole
- `fingerprint`  a cheap hash of a beton's tables: a finished run is never reused for
                 other data (config.json meta.betons)
- `augment`      the seeded random-resized-crop / centre-crop decoders (numba)
- `fast_decode`  the fused crop + DCT-scaled JPEG decode (`_fastjpeg.c`, libjpeg API)
- `loaders`      ffcv Loaders over a beton: the trainer's, the studies' and the analysis'
- `ffcv_patches` the places ffcv 1.0.2 itself is changed (loader threads, the writer's
                 watchdog), in one module to audit

Importing this package imports none of them (nor torch): each module is imported by name.
"""
