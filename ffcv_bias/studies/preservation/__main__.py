"""python -m ffcv_bias.studies.preservation ...: see cli.py and docs/DESIGN.md."""
import sys

from ffcv_bias.studies.preservation.cli import main

sys.exit(main())
