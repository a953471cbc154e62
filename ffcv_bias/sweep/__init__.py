"""Sweeps: grids of training runs over crop, weight decay, dropout and seeds.

    python -m ffcv_bias.sweep plan   SWEEP.yaml [--folder DIR]
    python -m ffcv_bias.sweep launch SWEEP.yaml [--backend local|slurm|submitit-local]
           [--folder DIR] [--max-parallel N] [--gpus none|N|0,2] [--dry-run] [--wait]
           [--partition P --account A --qos Q --constraint C --time MIN --gpus-per-node G
            --cpus-per-task C --mem 480G --mode pack|ddp --runs-per-node K]
    python -m ffcv_bias.sweep status SWEEP.yaml [--folder DIR]

plan    the run table (run_id, grid values, seed, state); nothing runs. Run ids come
        from the trainer's own config parser, in-process (220 runs in about a second).
launch  trains every run that is not complete; a relaunch after a crash, Ctrl-C or
        preemption skips finished runs and resumes started ones from checkpoint.pt.
          local           --max-parallel trainers at once on this machine, each pinned to
                          its GPU(s) by CUDA_VISIBLE_DEVICES, or on CPU with an equal share
                          of the cores (OMP_NUM_THREADS). One run failing never stops the
                          others; the exit code is 1 if any failed, after all finished.
          slurm           submitit job arrays, one node per job (see slurm.py: 'pack' runs
                          one single-GPU run per GPU of a node, 'ddp' one 8-GPU run per
                          node); jobs checkpoint and requeue on preemption and time limit.
                          Job ids go to <folder>/.sweep/jobs.json.
          submitit-local  the SLURM job code run by submitit's LocalExecutor here (all jobs
                          start at once): a rehearsal of a SLURM sweep on one machine.
status  counts per state, per grid point, and each failed run with its one-line error.

Run states: complete (summary.json), running (someone holds the run's lock), queued (its
SLURM job is still in squeue), failed (error.txt), started (checkpoint, nobody training
it), missing, invalid (the trainer's parser refused its config; launch refuses the sweep).
Every trainer's stdout and stderr are appended to <run_dir>/train.log; when a trainer dies
without writing error.txt, the launcher writes one: its last stderr line, then details.

A sweep file (YAML; any other top-level key is an error naming it):

    name: rn50_crop                 # job name; default: the file's stem
    base: ../rn50_88_epochs.yaml    # the trainer's config file: an absolute path, else
                                    # relative to this sweep file, else to the current dir
    folder: runs/rn50_crop          # logging.folder of every run, relative to the current
                                    # directory (--folder overrides it; default: the base
                                    # config's logging.folder)
    overrides:                      # fixed `--section.key=value` for every run
      data.train_dataset: /datasets/imagenet/train_500_0.50_90.ffcv
      training: {epochs: 88}        # nested sections work too
    grid:                           # cartesian product, keys in file order
      augment.min_scale: [1.0, 0.5, 0.08]
    points:                         # optional: settings whose keys change together,
      - {data.sparsity: 0.0}        #   each crossed with the grid (data diet: a sparsity
      - {data.sparsity: 0.5, data.keep_indices: keep_el2n_0.5.npy}  # and its index file)
    seeds: 20                       # N means seeds 0..N-1; or a list [0, 3, 7]
    max_parallel: 8                 # local: runs at once; slurm: array tasks at once
    slurm:                          # read by the slurm backends (flags override each key)
      partition: learnfair
      account: null
      qos: null
      constraint: volta32gb
      nodes: 1                      # a job is one node
      gpus_per_node: 8
      cpus_per_task: 80
      mem: 480G
      time: 600                     # minutes per job (required); timed-out jobs requeue
      mode: ddp                     # ddp: one run per node, its config's dist.world_size
                                    #   must equal gpus_per_node;
                                    # pack: runs_per_node single-GPU runs (world_size 1)
      runs_per_node: 8              # pack mode; default one per GPU
      max_timeouts: 10              # requeues after hitting the time limit, per job
      signal_delay_s: 90            # USR2 this long before the limit: trainers checkpoint

Booleans become 1/0 on the trainer's command line. `training.seed` and `logging.folder`
are set only through `seeds:` and `folder:`. Relative paths in overrides (datasets) are
read by the trainer from the directory `launch` was started in; SLURM jobs start there too.

Runs are ordered seed-major (every grid point with seed 0, then seed 1, ...), so a sweep
stopped half-way holds whole seeds of every setting. Each is
`python train_imagenet.py --config-file BASE --k=v ... --training.seed=S
--logging.folder=FOLDER`.
"""
from ffcv_bias.sweep.spec import (PlannedRun, SlurmSettings, Sweep, SweepError, expand,
                                  grid_points, load_sweep, plan, sweep_points)

__all__ = ["PlannedRun", "SlurmSettings", "Sweep", "SweepError", "expand", "grid_points",
           "sweep_points",
           "load_sweep", "plan"]
