"""Where the C extension ffcv_bias.data._fastjpeg is: fast_decode loads it with ctypes.

Beside this module when it is importable there; else in an ffcv_bias/data/ folder of another
sys.path entry. A checkout's ffcv_bias first on sys.path (bench/gpu_check.py puts it there)
shadows an installed one: on the GPU box the checkout has no build of the extension for its
Python 3.12, and bench/gpu_check.sh installs the device bundle (with one) into a temporary
--target folder on sys.path and PYTHONPATH. Only the file is needed (ctypes loads it), and
fast_decode's self-check still has to pass. Standard library only: cheap to import.
"""
import importlib.machinery
import os
import sys


def fastjpeg_file():
    """The extension's file; ImportError when there is none for this Python."""
    try:
        import ffcv_bias.data._fastjpeg as module
        return module.__file__
    except ImportError:
        folders = [os.path.join(entry or os.getcwd(), "ffcv_bias", "data")
                   for entry in sys.path if isinstance(entry, str)]
        spec = importlib.machinery.PathFinder.find_spec("_fastjpeg", folders)
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            raise
        return spec.origin
