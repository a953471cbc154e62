"""fastargs draws its `--help` tables with terminaltables' SingleTable, whose lines are
VT100 line-drawing escape codes (ESC ( 0 ... ESC ( B): a terminal shows lines, but
`--help > file` or `--help | less` kept the codes as garbage. `install()` makes fastargs use
a plain AsciiTable (+, -, |) whenever stdout is not a terminal; it is called where the
fastargs parsers live (ffcv_bias/train/__init__.py), so write_datasets.py and the trainer
both get it.
"""
import sys


def table_for_stdout(*args, **kwargs):
    """A SingleTable on a terminal, else an AsciiTable (no escape codes)."""
    from terminaltables import AsciiTable, SingleTable
    table_class = SingleTable if sys.stdout.isatty() else AsciiTable
    return table_class(*args, **kwargs)


def install():
    """Make fastargs draw its tables with table_for_stdout (idempotent)."""
    import fastargs.config
    fastargs.config.SingleTable = table_for_stdout
