"""Importing ffcv without its 5-second numba compile (installed by ffcv_bias/data/__init__).

ffcv 1.0.2's `ffcv/fields/rgb_image.py` builds its table of image modes, IMAGE_MODES
({'jpg': 0, 'raw': 1}), as a numba typed Dict at import time. Its first two assignments
make numba compile its dictionary code: about 5 s of CPU in every process that imports
any part of ffcv (every trainer, every sweep slot, every study), more than a small
training run spends training, and the getitem of each decoder's generate_code compiles
again. Only Python code reads the table (the decoders copy the numbers into their
closures before numba sees them; so do ffcv's writer and ffcv_bias/data/augment.py), so
a plain dict with the same two entries is the same table. This finder runs that one
module with `numba.typed.Dict` read as `dict`; everything else of ffcv is untouched.

Seen since, and harmless: when garbage collection runs at another moment than before
(under cProfile; in a child forked from a process that trained, as tests/test_faults.py's
fork server did before it collected first), numba's dispatcher finalizers can print
"Exception ignored ... KeyError" for pipelines ffcv compiled; plain trainer runs: 0 of 5.
"""
import importlib.abc
import importlib.machinery
import sys

MODULE = "ffcv.fields.rgb_image"


class _PlainDictModule(importlib.abc.Loader):
    """Runs ffcv's module with `from numba.typed import Dict` giving the builtin dict."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        import numba.typed
        typed_dict = numba.typed.Dict
        numba.typed.Dict = dict
        try:
            self.loader.exec_module(module)
        finally:
            numba.typed.Dict = typed_dict


class _RGBImageFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PlainDictModule(spec.loader)
        return spec


def install():
    """Idempotent; a no-op once ffcv's module is imported (then it is too late)."""
    if MODULE not in sys.modules and \
            not any(isinstance(finder, _RGBImageFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RGBImageFinder())
