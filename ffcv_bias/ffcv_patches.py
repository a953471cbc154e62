"""The two places where ffcv 1.0.2 itself must be changed, patched at import of our loaders.

Kept in one module so they are easy to audit and to drop once upstream fixes them.
`apply()` is idempotent.

1. `Compiler.set_num_threads` also calls `torch.set_num_threads(n)`, and the Loader calls it
   in its constructor, at every `__iter__` and in its worker thread: the loader's worker
   count silently becomes the *training* thread count on CPU, every epoch. Our version
   sets numba's threads only; the trainer owns torch's.

   Importing ffcv also pins torch to 1 thread (`Compiler.set_num_threads(1)` at import);
   `apply()` restores the count torch had before, when this module is imported first.

2. `Graph.group_operations` hangs forever on a pipeline that goes JIT -> torch -> JIT
   (e.g. NormalizeImage after ToTorchImage on CPU; upstream ffcv issue 396). Cause: after
   the first stage it does `current_front = next_front` without making a new `next_front`,
   so both names point to one set; a node deferred to the next stage is added back to the
   set being drained and popped again forever. Our version starts a fresh set per stage.
"""
import numba
import torch

# Importing ffcv runs `Compiler.set_num_threads(1)`, which pins torch to one thread.
# Remember torch's count first (when ffcv was not imported yet) and restore it.
_TORCH_THREADS_BEFORE_FFCV = torch.get_num_threads()

from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.graph import Graph  # noqa: E402

_APPLIED = {"done": False}


def _set_numba_threads_only(cls, n):
    if n < 1:
        n = numba.config.NUMBA_NUM_THREADS
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    cls.num_threads = n
    numba.set_num_threads(n)


def _group_operations(self):
    """Split the pipeline into alternating JIT / non-JIT stages (roots are JIT)."""
    stages = []
    current_front = set(self.root_nodes.keys())
    while current_front:
        jitted_stage = len(stages) % 2 == 0
        stage, deferred = [], set()
        while current_front:
            node = current_front.pop()
            if node.is_jitted == jitted_stage or node.is_jitted is None:
                stage.append(self.node_to_id[node])
                current_front.update(self.adjacency_list[node])
            else:
                deferred.add(node)
        stages.append(stage)
        current_front = deferred
    return stages


def apply():
    if _APPLIED["done"]:
        return
    Compiler.set_num_threads = classmethod(_set_numba_threads_only)
    Graph.group_operations = _group_operations
    torch.set_num_threads(_TORCH_THREADS_BEFORE_FFCV)
    _APPLIED["done"] = True
