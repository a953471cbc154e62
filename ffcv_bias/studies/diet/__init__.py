"""Data diet: EL2N and GraNd scores, pruned training sets, and what pruning does to each
class (Paul et al. 2021, "Deep Learning on a Data Diet"; Pote et al., "Classification Bias
on a Data Diet"). The commands and their files are described in cli.py:

    python -m ffcv_bias.studies.diet {score,prune,figures} --help

Modules: common (errors, parsing, the score directory), scores (per-sample scores of one
model, input norm, rank correlations), score_runs (the score command), quota (class-quota
pruning), prune, figures, cli. The names below are the
package's public surface, imported from those modules.
"""
from ffcv_bias.studies.diet.common import *  # noqa: F401,F403
from ffcv_bias.studies.diet.common import _save_npz  # noqa: F401
from ffcv_bias.studies.diet.scores import *  # noqa: F401,F403
from ffcv_bias.studies.diet.score_runs import *  # noqa: F401,F403
from ffcv_bias.studies.diet.prune import *  # noqa: F401,F403
from ffcv_bias.studies.diet.quota import *  # noqa: F401,F403
from ffcv_bias.studies.diet.figures import *  # noqa: F401,F403
from ffcv_bias.studies.diet.cli import build_parser, main  # noqa: F401
