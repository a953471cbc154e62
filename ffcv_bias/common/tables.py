"""CSV tables written atomically: a reader (or a rerun) never sees a half-written table."""
from ffcv_bias.common.atomic import atomic_path


def write_csv(frame, path, float_format=None):
    """`frame` without its index; float_format as pandas' (None: full precision)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=float_format)
