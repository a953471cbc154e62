import sys

from ffcv_bias.studies.diet.cli import main

sys.exit(main())
