"""A report folder written whole or not at all, and holding one analysis.

A report is many files (CSVs, PNGs, index.html). Written straight into --out, a full
disk or a Ctrl-C left a half report that looked like a report (CSVs without figures or
index.html), and a second analysis into the same folder kept the first one's files that
it did not rewrite (protocol tables of runs no longer analysed). So the report is built
in a hidden staging folder beside --out and put in place by renames at the end: an
earlier report at --out is replaced only once the new one is complete, and kept when the
new one fails. A folder that holds anything but an earlier report is refused: replacing
it would delete the user's files.
"""
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

# Written last into every report folder: what marks a folder as a report we may replace.
MARKER = ".ffcv_bias_report"
# Reports written before the marker existed are recognised by these files together.
EARLIER_REPORT_FILES = ("index.html", "runs.csv")


class NotAReportError(ValueError):
    """str() is one line naming the folder."""


def is_report_folder(path):
    path = Path(path)
    return (path / MARKER).is_file() or all((path / name).is_file()
                                            for name in EARLIER_REPORT_FILES)


def check_replaceable(out):
    """Raise NotAReportError unless `out` is absent, empty, or an earlier report."""
    out = Path(out)
    if not out.exists() or not out.is_dir():
        return
    if any(out.iterdir()) and not is_report_folder(out):
        raise NotAReportError(f"{out} holds files that are not an analysis report: give a new "
                              f"or empty folder (a report folder holds one analysis and is "
                              f"replaced whole)")


@contextmanager
def staged_folder(out):
    """Yield a hidden staging folder beside `out`; on success put it at `out` (replacing
    an earlier report), on any failure or interrupt remove it and leave `out` as it was."""
    out = Path(out)
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    try:
        yield staging
        (staging / MARKER).write_text("written by python -m ffcv_bias.analysis\n")
        _put_in_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _put_in_place(staging, out):
    if not out.exists():
        os.rename(staging, out)
        return
    aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
