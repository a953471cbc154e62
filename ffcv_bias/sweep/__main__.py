import signal
import sys

from ffcv_bias.sweep.cli import main

# `plan ... | head` should stop quietly, not end in a BrokenPipeError traceback.
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
sys.exit(main())
