"""Data diet: EL2N and GraNd scores early in training, pruned training sets, and what pruning
does to each class (Paul et al. 2021, "Deep Learning on a Data Diet"; Pote et al.,
"Classification Bias on a Data Diet").

Three commands, in the order of the flow (scores -> pruned sets -> runs -> figures):

score
    python -m ffcv_bias.studies.diet score --config-file rn50_configs/cifar10_resnet18.yaml \\
        [--section.key=value ...] --epochs 20 --seeds 10 --out diet/cifar10/scores \\
        [--max-parallel N] [--also-init] [--quota-val-fraction 0.1] \\
        [--grand-params all|last] [--batch-size 256] [--grand-chunk N] [--device cuda] \\
        [--random-seed 0] [--no-train]

  Trains K runs (seeds 0..K-1, or a list "0,3,7"; default 10) of the config's OWN schedule
  as ordinary run records that also keep their weights after epoch k = --epochs
  (`training.save_weights_at=k`, which changes neither the result nor the run_id):
  `python train_imagenet.py --config-file ... --training.seed=s
  --training.save_weights_at=k --logging.folder=SCORES_DIR/runs`, through the sweep's
  TrainerPool, --max-parallel at a time (a rerun skips complete runs and resumes started
  ones; a sweep that trains the same runs, e.g.
  rn50_configs/sweeps/diet_cifar10_resnet18_scores.yaml, makes this step a no-op). A
  complete run without weights_epoch<k>.pt is an error (it cannot make them). Then it
  scores every training image with each run's epoch-k weights and averages over the runs:
    EL2N   || softmax(f(x)) - onehot(y) ||_2
    GraNd  || d loss(f(x), y) / d theta ||_2, one gradient per image, vectorized with
           torch.func (functional_call + vmap(grad)), in chunks of --grand-chunk images
           (default: as many as 1 GiB of gradients on CPU, 1/8 of the free GPU memory)
  and the baselines that tell whether a score carries information (Kirsch 2023):
    input_norm  || x ||_2 of the normalized image the network sees
    random      a seeded uniform score (--random-seed)
    el2n_init, grand_init  with --also-init: the same seeds' initial networks
  It prints and saves the Spearman rank correlation between every pair of them.
  Images are read without augmentation: the training beton in its own order, the centre
  crop of ratio 1.0 (the whole image), at the training resolution of epoch k. The loss
  is plain cross-entropy (no label smoothing), as in Paul et al. BatchNorm uses its running
  statistics (eval mode), so an image's gradient is that of its own loss alone (in train
  mode its output would depend on the rest of its batch); dropout is off.
  --grand-params all (default, as Paul et al.) differentiates every parameter; `last` only
  the final linear layer (a cheap option for ImageNet-size models). --epochs 0 scores
  freshly initialised networks (Paul et al.'s GraNd at initialisation): nothing is trained.
  --no-train scores runs trained elsewhere and fails if one lacks the weights it needs.
  --quota-val-fraction F (for `prune --score class-quota`): holds out round(F N_k) images
  of each class of the TRAINING set (stratified, --random-seed), trains one run of the
  config (the first seed) on the rest and saves its recall of each class on them.
  Outputs in SCORES_DIR (all written atomically):
    scores.npz   indices, labels, el2n, grand, input_norm, random ([N]; el2n and grand are
                 means over the runs), el2n_runs, grand_runs ([K, N]), seeds, run_ids
                 (+ el2n_init, grand_init and their _runs with --also-init)
    scores.csv   index, label, class_name, then every score
    correlations.csv  score, label (EL2N@20, GraNd@20, GraNd@init, input norm, random),
                 then the Spearman correlation with each score (n = N training images)
    scores.json  how they were made: config file, overrides, epochs (k), full_epochs,
                 weights (weights_epoch<k>.pt), seeds, run ids, resolution, grand_params,
                 the train beton and its class names, scores; class_quota with
                 --quota-val-fraction (split files and their hash, run id, recalls)
    quota_val_indices.npy, quota_train_indices.npy, class_recall.csv
                 with --quota-val-fraction: the split and the recalls
    per_run/     each run's scores (a rerun after a crash reuses them, unless the run's
                 weights changed)
    runs/        the K run records (and the held-out run)

prune
    python -m ffcv_bias.studies.diet prune --scores SCORES_DIR --score el2n \\
        --sparsity 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9 --out DIR [--seeds 3] \\
        [--base-config FILE] [--set section.key=value ...] [--folder RUNS_DIR] \\
        [--max-parallel N] [--name NAME]

  Policies (--score): score-top keeps, for each sparsity s, the round((1 - s) N)
  highest-scoring training images (el2n, grand, input_norm, el2n_init, grand_init; ties
  go to the lower index); `random` is random pruning (the random score); `class-quota`
  (DRoP, Vysogorets et al. 2025) keeps per class a quota proportional to N_k (1 - r_k),
  r_k the held-out recall of `score --quota-val-fraction`, capped at the class size with
  the excess redistributed, random within each class (a class without error on the split
  weighs 0 and may be pruned away); `class-quota-laplace` is the same with each error rate
  estimated as (errors + 1) / (n_k + 2), so no class weighs 0. It writes the sweep that
  trains on them. The base config is the one the scores were made with (its overrides
  included), unless
  --base-config is given; --set adds or replaces overrides. The train beton must be the
  scored one (checked through its labels). Everything is checked (the sweep planned, every
  run's config through the trainer's checks) in a hidden staging folder inside DIR before
  any file of DIR is replaced: a refused prune leaves DIR as it was. Outputs in DIR:
    keep_<score>_<s>.npy  the kept indices (int64, ascending), one file per sparsity
    sweep.yaml            one sweep whose `points:` are the dense reference (sparsity 0,
                          no keep_indices) and then each sparsity with its own index file;
                          every point sets data.sparsity and data.score (= the score, also
                          on the dense point, so the analysis pools each score's runs with
                          its own reference; each score's sweep thus trains its own dense
                          runs), each point x `seeds` seeds, all runs in one folder
                          (--folder, default DIR/runs). Launch it as any sweep:
                            python -m ffcv_bias.sweep launch DIR/sweep.yaml [options]
                          (also `plan`, `status`)
    base.yaml             an empty base config, only when the scores were made from
                          command-line settings alone (they become the overrides)
    keep_ratio.csv        class, class_name, n_total, kept_<s> and ratio_<s> per sparsity
    keep_ratio.png        class-wise keep ratio vs sparsity (Pote et al. Fig. 6)
    prune.json            policy, scores folder, sparsities, kept counts; for class-quota
                          the held-out split (files, hash), recalls and quotas per sparsity
  The sweep is planned with the sweep package and every run's config is checked with the
  trainer's own checks before prune returns.

figures
    python -m ffcv_bias.studies.diet figures --runs RUNS_DIR --out OUT \\
        [--scores SCORES_DIR] [--top-k 10]

  Reads the pruned runs (every data.score found in RUNS_DIR, each with its dense
  reference) through the analysis package (`--vary data.sparsity --vary data.score`), and
  writes to OUT:
    best_worst_<score>.png   the top-k best and worst classes of the dense model vs
                             sparsity (Pote et al. Fig. 4; k is at most half the classes,
                             so with 10 classes the two panels hold all of them: Fig. 3).
                             The classes are chosen on the lower half of the dense seeds
                             and the curves drawn from the other seeds only, at every
                             sparsity (choosing and drawing on the same runs shows "the
                             worst classes improve" by regression to the mean alone); the
                             figure says which; with one dense seed it says IN-SAMPLE
    worst_class.png          worst-class accuracy vs sparsity, mean +- sd over seeds
    class_std.png            std of per-class accuracy vs sparsity, mean +- sd over seeds
                             (Fig. 5)
    top1.png                 top-1 vs sparsity (Figs. 1-2)
    best_worst_classes.csv   those classes' mean accuracy at every sparsity over the
                             plotted seeds (n_runs), with selection, chosen_on_seeds and
                             plotted_seeds
    keep_ratio_<score>.png/.csv  with --scores: the keep ratio at the runs' sparsities
  The full per-class analysis (Welch tests, tables, HTML report) is the analysis command:
    python -m ffcv_bias.analysis RUNS_DIR --vary data.sparsity --vary data.score --out OUT

Exit status: 0 done, 1 a training run failed or the disk is full, 2 bad input (one line
on stderr), 130 interrupted (Ctrl-C: one line; what finished is kept and a rerun goes on).
"""
import sys

from ffcv_bias.common.atomic import NoRoomError
from ffcv_bias.common.errors import EXIT_OK, OneLineArgumentParser, main_guard
from ffcv_bias.common.output_paths import path_text
from ffcv_bias.studies.diet.common import GRAND_PARAMS, PRUNE_CHOICES, DietError
from ffcv_bias.studies.diet.common import parse_overrides
from ffcv_bias.studies.diet.figures import run_figures
from ffcv_bias.studies.diet.prune import run_prune
from ffcv_bias.studies.diet.score_runs import run_scores


def build_parser():
    parser = OneLineArgumentParser(
        prog="python -m ffcv_bias.studies.diet",
        description="Data diet: EL2N/GraNd scores, pruned training sets, class-wise bias.")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="train K short runs and score every training "
                                              "image (EL2N, GraNd); other --section.key=value "
                                              "arguments go to the trainer")
    score.add_argument("--config-file", "-C", action="append", default=[], type=path_text,
                       help="the trainer's YAML config (repeatable, later files win)")
    score.add_argument("--epochs", type=int, required=True,
                       help="the scoring epoch k: each run trains on the config's own "
                            "schedule and keeps its weights after epoch k (the paper's "
                            "early epoch, e.g. 20); 0 = score freshly initialised networks")
    score.add_argument("--seeds", default="10", help="runs averaged: a count K (seeds "
                                                     "0..K-1) or a list 0,3,7 (default 10)")
    score.add_argument("--max-parallel", type=int, default=1,
                       help="runs trained at once (sharing the cores or GPUs; default 1)")
    score.add_argument("--also-init", action="store_true",
                       help="also score the same seeds' initial networks (el2n_init, "
                            "grand_init: GraNd at initialisation beside GraNd@k)")
    score.add_argument("--quota-val-fraction", type=float, default=0.0,
                       help="for class-quota pruning: hold out this fraction of each class "
                            "of the TRAINING set, train one run on the rest, save its "
                            "per-class recall on the held-out images (default 0: none)")
    score.add_argument("--out", required=True, type=path_text, help="the score directory")
    score.add_argument("--grand-params", choices=GRAND_PARAMS, default="all",
                       help="GraNd over all parameters (default) or the last layer only")
    score.add_argument("--batch-size", type=int, default=256, help="images per loader batch")
    score.add_argument("--grand-chunk", type=int, default=None,
                       help="images per vmap chunk of per-sample gradients (default: as many "
                            "as fit 1 GiB of gradients on CPU, 1/8 of the free GPU memory)")
    score.add_argument("--device", default=None, help="torch device (default: cuda if there)")
    score.add_argument("--random-seed", type=int, default=0,
                       help="seed of the random-score baseline")
    score.add_argument("--no-train", action="store_true",
                       help="only score: every run must already have the weights scored")

    prune = commands.add_parser("prune", help="pruned index files, keep ratio, the sweep")
    prune.add_argument("--scores", required=True, type=path_text, help="a score directory")
    prune.add_argument("--score", required=True, choices=PRUNE_CHOICES,
                       help="score-top: keep the highest el2n, grand, input_norm, el2n_init "
                            "or grand_init; random: random pruning; class-quota: per-class "
                            "quotas N_k (1 - r_k) from the held-out recalls (DRoP); "
                            "class-quota-laplace: the same, error rates (e + 1) / (n + 2)")
    prune.add_argument("--sparsity", required=True,
                       help="fractions pruned away, e.g. 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    prune.add_argument("--out", required=True, type=path_text,
                       help="where the index files and the sweep go")
    prune.add_argument("--seeds", default="3", help="training seeds per sparsity (count or "
                                                    "list; default 3)")
    prune.add_argument("--base-config", default=None, type=path_text,
                       help="the pruned runs' config (default: the scores' config and "
                            "overrides)")
    prune.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="an override for every pruned run (repeatable)")
    prune.add_argument("--folder", default=None, type=path_text,
                       help="run folder (default: OUT/runs)")
    prune.add_argument("--max-parallel", type=int, default=None,
                       help="max_parallel of the sweep")
    prune.add_argument("--name", default=None, help="sweep name (default diet_SCORE)")

    figures = commands.add_parser("figures", help="Figs. 4-6 of Pote et al. from pruned runs")
    figures.add_argument("--runs", required=True, type=path_text,
                         help="folder of the pruned runs")
    figures.add_argument("--out", required=True, type=path_text, help="where the figures go")
    figures.add_argument("--scores", default=None, type=path_text,
                         help="score directory: also draw the keep ratio (Fig. 6)")
    figures.add_argument("--top-k", type=int, default=10,
                         help="best and worst classes of the dense model drawn (default 10)")
    return parser


def check_prune_options(options):
    """What `prune` used to read as 'not given' (a 0 or an empty text), said before any
    work."""
    if options.max_parallel is not None and options.max_parallel < 1:
        raise DietError(f"--max-parallel must be >= 1, not {options.max_parallel}")
    if options.name is not None and not options.name.strip():
        raise DietError(f"--name {options.name!r} is empty: give the sweep a name, or leave "
                        f"--name out for diet_{options.score}")


@main_guard(failures=(NoRoomError,),  # a full disk: one line naming the file (exit 1)
            interrupted="interrupted; trained runs, checkpoints and per-run scores are "
                        "kept (no file is half-written): rerun the same command to go on")
def main(argv=None):
    """Exit 0, 1 (a score run's training failed: TrainingFailed; a full disk), 2 (bad
    input) or 130 (Ctrl-C)."""
    parser = build_parser()
    options, extra = parser.parse_known_args(argv)
    if options.command == "score":
        run_scores(options, parse_overrides(extra))
    elif extra:
        raise DietError(f"unexpected argument '{extra[0]}'")
    elif options.command == "prune":
        check_prune_options(options)
        run_prune(options)
    else:
        run_figures(options)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
