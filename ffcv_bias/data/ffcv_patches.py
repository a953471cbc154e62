"""The places where ffcv 1.0.2 itself must be changed, patched at import of our loaders.

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

3. (CUDA only) `EpochIterator.run`, ffcv's loader thread, never selects a GPU: a new
   thread's current device is 0, so leaving `torch.cuda.stream(slot_stream)` resets
   device 0's stream and creates a CUDA context on GPU 0 in every rank (~0.5 GB each on
   GPU 0 with 8 ranks). Ours first selects the device of the iterator's streams.

4. (CUDA only) ffcv waits for a batch slot's earlier GPU work with `event.wait()`, which
   orders *streams*, not the loader thread's numba writes into the slot's pinned host
   buffer: with the GPU behind, the host buffer can be overwritten while the previous
   non-blocking copy out of it is still queued. Ours records an event on the slot's
   stream after each batch is submitted and makes the loader thread wait for it
   (`synchronize`) before decoding into that slot again. It costs nothing while the GPU
   keeps up, and throttles the loader (instead of corrupting a batch) when it does not.

5. (writing betons) `DatasetWriter` polls a shared counter until every sample is written,
   with no timeout: a worker that died (disk full, killed) means a writer that hangs
   forever. `watching_workers` wraps the `Process` name ffcv's writer module uses, to see
   the workers, and a watchdog thread turns a dead one into WriterWorkerDied. The wrapped
   workers also die with their parent (a SIGKILLed writer left them running). Not part of
   `apply()`: data/writer.py enters it around each write.

6. (every process) Importing ffcv compiles numba's typed-dictionary code for its table of
   image modes, ~5 s of CPU per process; data/ffcv_import.py (installed by importing
   `ffcv_bias.data`, before anything imports ffcv) makes that table a plain dict.

7. An exception in `EpochIterator.run` (a numba compile error, a decode error, a
   MemoryError) ends ffcv's loader thread silently, and the training loop then waits in
   `__next__` for a batch that never comes: a hang instead of an error. Ours records the
   exception, ends the epoch's queue, and `__next__` raises LoaderThreadError (the
   thread's exception as its cause) in the loop.

8. The memory managers' `state_type` marks its arrays read-only by *mutating* numba's
   shared, interned array types (`t = nb.uint8[::1]; t.mutable = False`, at every Loader):
   from then on every `uint8[::1]` in the process says read-only and, worse, hashes
   differently from when it went into a dict, so numba's per-function table of compiled
   signatures (an OrderedDict keyed by argument types) fails with KeyError the next time
   it is read. A compiled function shared by two loaders (patch 9: our JPEG decode chain)
   then dies in the second loader's thread. Ours builds new read-only types and leaves
   numba's alone; the OS-cache reader returns the read-only array it reads (ffcv declared
   a mutable one, which only compiled because of the mutation).

9. `Compiler.compile` wraps every operation's code in a new numba dispatcher, and every
   Loader asks for new code, so each Loader compiles its whole pipeline again, the parts
   that are the same in every loader included (the label decoder, the file reader, our
   JPEG decode chain): ~1 s of CPU per loader, a trainer builds two or three. Ours returns
   the dispatcher it made before for the same function code, defaults, closure and flags
   (the compiled code is then the same: numba freezes a closure's variables when it
   compiles), so those parts are compiled once per process.
"""
import collections
import contextlib
import functools
import os
import queue
import signal
import sys
import threading

import numba
import numpy as np
import torch

# Importing ffcv runs `Compiler.set_num_threads(1)`, which pins torch to one thread.
# Remember torch's count first (when ffcv was not imported yet) and restore it.
_TORCH_THREADS_BEFORE_FFCV = torch.get_num_threads()

from ffcv.loader import epoch_iterator  # noqa: E402
from ffcv.memory_managers.os_cache import OSCacheManager  # noqa: E402
from ffcv.memory_managers.process_cache.manager import ProcessCacheManager  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.graph import Graph  # noqa: E402

from ffcv_bias.common.atomic import NO_ROOM_ERRNOS  # noqa: E402
from ffcv_bias.common.children import die_with_parent  # noqa: E402

_ORIGINAL_RUN = epoch_iterator.EpochIterator.run
_ORIGINAL_COMPILE = Compiler.compile
_ORIGINAL_RUN_PIPELINE = epoch_iterator.EpochIterator.run_pipeline
_ORIGINAL_NEXT = epoch_iterator.EpochIterator.__next__

_APPLIED = {"done": False}


def _set_numba_threads_only(cls, n):
    if n < 1:
        n = numba.config.NUMBA_NUM_THREADS
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    cls.num_threads = n
    numba.set_num_threads(n)


# Patch 9: (code, defaults, closure, signature, parallel) -> dispatcher, the newest last.
_DISPATCHERS = collections.OrderedDict()
_DISPATCHERS_KEPT = 512   # a bound: most entries are per-loader code that never comes back
_DISPATCHERS_LOCK = threading.Lock()
_FROZEN_BY_VALUE = (bool, int, float, complex, str, bytes, type(None))


def _cell_key(cell):
    """How a closure variable enters the key: scalars by type and repr (exact for floats,
    -0.0 apart from 0.0); other objects by identity (the cached function keeps them alive,
    so an id is not reused while its entry lives); None for a numpy array, whose contents
    numba freezes at compile time and may change, and for an empty cell."""
    try:
        value = cell.cell_contents
    except ValueError:
        return None
    if isinstance(value, _FROZEN_BY_VALUE):
        return type(value), repr(value)
    if isinstance(value, np.ndarray):
        return None
    return "id", id(value)


def _dispatcher_key(code, signature, parallel):
    """The key under which `code` may reuse a dispatcher, or None when it may not."""
    if not hasattr(code, "__code__"):
        return None
    cells = tuple(_cell_key(cell) for cell in (code.__closure__ or ()))
    if any(cell is None for cell in cells):
        return None
    key = (code.__code__, code.__defaults__, cells, signature, parallel,
           id(code.__globals__))
    try:
        hash(key)
    except TypeError:   # an unhashable default or signature: compile as ffcv does
        return None
    return key


def _compile_once(cls, code, signature=None):
    parallel = bool(getattr(code, "is_parallel", False)) and cls.num_threads > 1
    key = _dispatcher_key(code, signature, parallel) if cls.is_enabled else None
    if key is None:
        return _ORIGINAL_COMPILE(code, signature)
    with _DISPATCHERS_LOCK:   # loaders may be built from several threads
        if key not in _DISPATCHERS:
            _DISPATCHERS[key] = _ORIGINAL_COMPILE(code, signature)   # lazy: compiles nothing
            if len(_DISPATCHERS) > _DISPATCHERS_KEPT:
                _DISPATCHERS.popitem(last=False)
        _DISPATCHERS.move_to_end(key)
        return _DISPATCHERS[key]


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


def _streams_device(iterator):
    """The GPU of the iterator's batch-slot streams, or None without CUDA."""
    streams = [stream for stream in getattr(iterator, "cuda_streams", []) if stream is not None]
    return streams[0].device if (epoch_iterator.IS_CUDA and streams) else None


def _run_on_streams_device(self):
    device = _streams_device(self)
    if device is not None:
        torch.cuda.set_device(device)  # per thread: the loader thread starts on GPU 0
    return _ORIGINAL_RUN(self)


def _readonly(dtype, ndim):
    """A new read-only C-contiguous array type (numba's interned `dtype[::1]` untouched)."""
    return numba.types.Array(dtype, ndim, "C", readonly=True)


def _os_cache_state_type(self):
    """(file bytes, sample addresses, sample sizes): the bytes read-only, as ffcv meant."""
    return numba.types.Tuple([_readonly(numba.uint8, 1), numba.uint64[::1],
                              numba.uint64[::1]])


def _os_cache_compile_reader(self):
    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address:address + size]

    return Compiler.compile(read, _readonly(numba.uint8, 1)(numba.uint64, self.state_type))


def _process_cache_state_type(self):
    """(page slots, sample addresses, sample sizes, page -> slot), all read-only."""
    return numba.types.Tuple([_readonly(numba.uint8, 2), _readonly(numba.uint64, 1),
                              _readonly(numba.uint64, 1), _readonly(numba.uint32, 1)])


class LoaderThreadError(RuntimeError):
    """ffcv's loader thread failed; `__cause__` is its exception, with its traceback."""


# How long the failed thread waits for room in a full batch queue before it checks again
# whether the loop has given up on the epoch (ffcv's own thread polls alike).
_QUEUE_POLL_S = 0.5


def _run_reporting_errors(self):
    try:
        _run_on_streams_device(self)
    except BaseException as error:  # noqa: BLE001 - any exception would leave a hang
        self._thread_error = error
        while not self.terminate_event.is_set():   # None: ffcv's end of the epoch
            try:
                self.output_queue.put(None, timeout=_QUEUE_POLL_S)
                return
            except queue.Full:
                pass


def _next_raising_thread_errors(self):
    try:
        return _ORIGINAL_NEXT(self)
    except StopIteration:
        error = self.__dict__.get("_thread_error")
        if error is None:
            raise
        raise LoaderThreadError(f"ffcv's loader thread failed: {type(error).__name__}: "
                                f"{error}") from error


def _run_pipeline_after_slot_copy(self, b_ix, batch_indices, batch_slot, cuda_event):
    if not epoch_iterator.IS_CUDA:
        return _ORIGINAL_RUN_PIPELINE(self, b_ix, batch_indices, batch_slot, cuda_event)
    copies_done = self.__dict__.setdefault("_slot_copies_done", {})
    previous = copies_done.pop(batch_slot, None)
    if previous is not None:
        previous.synchronize()  # the slot's host buffer is read by no queued copy any more
    result = _ORIGINAL_RUN_PIPELINE(self, b_ix, batch_indices, batch_slot, cuda_event)
    done = torch.cuda.Event()
    done.record(self.cuda_streams[batch_slot])
    copies_done[batch_slot] = done
    return result


def apply():
    if _APPLIED["done"]:
        return
    Compiler.set_num_threads = classmethod(_set_numba_threads_only)
    Compiler.compile = classmethod(_compile_once)
    Graph.group_operations = _group_operations
    epoch_iterator.EpochIterator.run = _run_reporting_errors
    epoch_iterator.EpochIterator.__next__ = _next_raising_thread_errors
    epoch_iterator.EpochIterator.run_pipeline = _run_pipeline_after_slot_copy
    OSCacheManager.state_type = property(_os_cache_state_type)
    OSCacheManager.compile_reader = _os_cache_compile_reader
    ProcessCacheManager.state_type = property(_process_cache_state_type)
    torch.set_num_threads(_TORCH_THREADS_BEFORE_FFCV)
    _APPLIED["done"] = True


# ---------------------------------------------------------------------------------------
# 5. The writer: ffcv's DatasetWriter waits forever for a worker that died
# ---------------------------------------------------------------------------------------
# (used by data/writer.py's run_writer; imported there only when a beton is written)

class WriterWorkerDied(Exception):
    """Raised in the main thread (through SIGUSR1) when a writer worker process died."""


class WorkerWatchdog(threading.Thread):
    """Signals the main thread when a writer worker dies (disk full, killed, a bug).

    ffcv's DatasetWriter polls a shared counter until every sample is written and has no
    timeout: without this, a dead worker means a process that hangs forever. The signal
    (SIGUSR1, sent to this process) interrupts ffcv's polling loop; the handler set by
    `watching_workers` turns it into WriterWorkerDied.
    """

    def __init__(self, workers, poll_seconds=0.2):
        super().__init__(daemon=True)
        self.workers = workers  # filled by recording_writer_processes as ffcv starts them
        self.poll_seconds = poll_seconds
        self.dead_exitcode = None
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.poll_seconds):
            for worker in list(self.workers):
                if worker.exitcode not in (None, 0):
                    self.dead_exitcode = worker.exitcode
                    os.kill(os.getpid(), signal.SIGUSR1)
                    return

    def stop(self):
        self.stopped.set()
        if self.is_alive():
            self.join()

    def terminate_workers(self):
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)


@contextlib.contextmanager
def recording_writer_processes():
    """Yield the list of worker processes ffcv's DatasetWriter starts meanwhile, each
    running under writer_worker.

    ffcv keeps its workers in a local variable; wrapping the `Process` name its writer
    module uses is the one way to see them (their exit codes) from outside."""
    import ffcv.writer
    started = []
    original = ffcv.writer.Process

    def start_recorded(*args, target=None, **kwargs):
        process = original(*args, target=functools.partial(writer_worker, target, os.getpid()),
                           **kwargs)
        started.append(process)
        return process

    ffcv.writer.Process = start_recorded
    try:
        yield started
    finally:
        ffcv.writer.Process = original


def release_shared_memory(writer):
    """ffcv frees its shared metadata buffer only on success; free it on failure too."""
    from multiprocessing import shared_memory
    buffer = getattr(writer, "metadata_sm", None)
    if isinstance(buffer, shared_memory.SharedMemory):
        with contextlib.suppress(Exception):
            buffer.close()
        with contextlib.suppress(Exception):
            buffer.unlink()


@contextlib.contextmanager
def watching_workers():
    """Yield a WorkerWatchdog over the writer processes started meanwhile; its alarm
    raises WriterWorkerDied here. Signal handlers can only be set from the main thread:
    elsewhere the watchdog only records the workers."""
    with recording_writer_processes() as workers:
        watchdog = WorkerWatchdog(workers)
        if threading.current_thread() is not threading.main_thread():
            yield watchdog
            return
        previous_handler = signal.getsignal(signal.SIGUSR1)

        def on_alarm(signum, frame):
            if watchdog.dead_exitcode is not None:
                raise WriterWorkerDied(watchdog.dead_exitcode)
            if callable(previous_handler):  # a SIGUSR1 from someone else
                previous_handler(signum, frame)

        signal.signal(signal.SIGUSR1, on_alarm)
        watchdog.start()
        try:
            yield watchdog
        finally:
            watchdog.stop()
            signal.signal(signal.SIGUSR1, previous_handler)


def writer_worker(target, parent_pid, *args):
    """An ffcv writer worker that dies with its parent (a SIGKILLed write_datasets.py left
    it running, holding the temporary beton and a /dev/shm segment) and, on a full disk,
    exits with the errno as its exit code (no traceback): run_writer then names the beton
    and the reason in one line."""
    die_with_parent(parent_pid)
    try:
        target(*args)
    except OSError as error:
        if error.errno not in NO_ROOM_ERRNOS:
            raise
        sys.stderr.flush()
        os._exit(error.errno)
