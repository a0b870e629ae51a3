"""Several processes that talk to each other: starting them, and the messages they exchange.

Tensor parallelism (`course_lib.parallel.tensor_parallel`) and ring attention (`course_lib.parallel.ring_attention`)
run one copy of the program per *rank* (a process; on a cluster, one per GPU). The ranks of a
`torch.distributed` process group exchange tensors through a backend: gloo on CPUs (what this
course uses on a laptop), NCCL between NVIDIA GPUs. Three pieces live here:

- `launch(fn, world_size, ...)` starts `world_size` processes with `torch.multiprocessing` (forkserver,
  or spawn where there is no forkserver; never a plain fork of a notebook kernel),
  joins them into a gloo group through a file (no network port to pick, so two launches at once
  cannot collide), runs `fn(rank, world_size, *args)` in each and returns the list of results
  (pickled by value: tensors come back as copies). A rank that raises, dies, hangs or returns
  something that cannot be pickled fails the launch with that rank's error, after at most
  `timeout` seconds; every other rank is then stopped. `fn` must be importable (defined in a
  module, not in a notebook cell, or a functools.partial of such a function): a spawned process
  imports it by name.
- `Comm`: the messages, counted. `ring_shift` sends a tensor to the next rank and receives one from
  the previous rank (the step of every ring algorithm); `all_to_all` sends rank j its own chunk
  of a tensor (Ulysses' change from sequence shards to head shards); `all_reduce` sums a tensor over the ranks
  with the ring algorithm (a reduce-scatter then an all-gather, each R - 1 ring steps), which is
  what NCCL and gloo do for large tensors. Every byte sent and received is counted, so the
  notebook can compare the count with the formula.
- `saved_bytes(fn)`: how many bytes of tensors autograd keeps for the backward pass while `fn` runs
  (the activation memory a rank needs).

Under `torchrun` (or `python -m torch.distributed.run`), the processes are started for you and
`init_from_env()` joins them into a group; `self_check_main` runs a module's self-check either way.
"""

from __future__ import annotations

import argparse
import functools
import math
import numbers
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from course_lib._validate import check_nonnegative_int, check_positive_int

__all__ = ["launch", "run_many", "Comm", "ring_allreduce_bytes", "saved_bytes", "time_steps", "init_from_env",
           "self_check_main", "RankFailure", "demo_failure", "check_collectives"]


class RankFailure(RuntimeError):
    """A rank of a launch raised, died or did not finish in time; the message says which and why."""


# ----------------------------------------------------------------------------- starting the ranks
def _worker(rank: int, world_size: int, store_path: str, timeout: float, fn: Callable, args: tuple,
            results) -> None:
    """What each spawned process runs: join the group, call fn, report (rank, ok, result or traceback)."""
    torch.set_num_threads(1)  # R processes on a few cores: one thread each, or they fight for the cores
    # every rank is on this machine: talk over the loopback interface (gloo otherwise picks the interface of
    # the machine's hostname, which on some laptops does not resolve)
    loopback = {"linux": "lo", "darwin": "lo0"}.get(sys.platform)
    if loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=2 * timeout))  # launch's own deadline comes first
        try:
            value = fn(rank, world_size, *args)
            dist.barrier()  # no rank leaves (closing its connections) while another still needs them
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything, the parent decides
        results.put((rank, False, traceback.format_exc()))
        return
    # Pickled here, by value: the queue would pickle it in a background thread that only prints a
    # failure (the parent would wait for the timeout), and would send a tensor as a handle to this
    # process's shared memory, which is gone once this process exits.
    try:
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - any pickling error: a lambda, a lock, a generator, ...
        results.put((rank, False, f"fn returned a {type(value).__name__}, which cannot be pickled to send it back "
                                  f"to the launching process ({type(e).__name__}: {e}); return numbers, strings, "
                                  f"numpy arrays or tensors, in lists, tuples or dicts"))
        return
    results.put((rank, True, payload))


def _context():
    """forkserver where the platform has it (Linux, macOS), else spawn (Windows).

    Both start clean processes that import `fn` by name (never fork a notebook kernel with its
    threads). forkserver imports torch once, in a server process, and forks every later rank from
    it: a launch then starts in about a second instead of paying for torch's imports in every rank.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # torch.autograd's first backward imports symbolic_shapes (and sympy): seconds per rank, paid once here
        ctx.set_forkserver_preload(
            ["torch", "torch.fx.experimental.symbolic_shapes", "course_lib.parallel.distributed"])
        return ctx
    return mp.get_context("spawn")


def _importable(fn: object) -> bool:
    """Can a fresh process find fn by name? (a function or class at the top level of a module, or a partial of one)"""
    while isinstance(fn, functools.partial):
        fn = fn.func
    qualname = str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)
    return getattr(fn, "__module__", None) not in (None, "__main__") and "<locals>" not in qualname \
        and "<lambda>" not in qualname


def _death(rank: int, world_size: int, exitcode: int) -> str:
    """What became of a rank whose process ended without reporting a result."""
    if exitcode < 0:
        try:
            how = f"was killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"died with exit code {exitcode}"
    return f"rank {rank} of {world_size} {how} before reporting a result"


def launch(fn: Callable, world_size: int, args: tuple = (), *, timeout: float = 60.0) -> list:
    """Run fn(rank, world_size, *args) in world_size fresh processes joined by gloo; return their results.

    fn: a function at the top level of an importable module, or a functools.partial of one.
    args: a tuple (or list) of further arguments, the same for every rank; fn and args must be picklable.
    The results (one per rank, in rank order) come back pickled by value: numbers, numpy arrays,
    tensors (as copies) and containers of them. Raises RankFailure naming the rank that failed
    first, with its traceback (a rank that died names its exit code; a result that cannot be
    pickled is reported at once), or the ranks still running after `timeout` seconds (the whole
    launch, start-up included).
    """
    check_positive_int("world_size", world_size)
    if not callable(fn) or not _importable(fn):
        raise TypeError(f"fn must be a function defined at the top level of an importable module (a spawned "
                        f"process imports it by name), or a functools.partial of one; got {fn!r}")
    if not isinstance(args, tuple | list):
        raise TypeError(f"args must be a tuple of the further arguments of fn(rank, world_size, *args); got "
                        f"{args!r} ({type(args).__name__}); for one argument write args=({args!r},)")
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a positive number of seconds; got {timeout!r} ({type(timeout).__name__})")
    if not (math.isfinite(timeout) and timeout > 0):  # NaN and inf would pass `timeout <= 0`, then fail every rank
        raise ValueError(f"timeout must be a finite positive number of seconds; got {timeout!r}")
    timeout = float(timeout)
    ctx = _context()
    results = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="course_lib_rendezvous_")
    store_path = os.path.join(tmp, "store")
    processes = [ctx.Process(target=_worker, args=(r, world_size, store_path, timeout, fn, tuple(args),
                                                   results), daemon=True)
                 for r in range(world_size)]
    deadline = time.monotonic() + timeout
    collected: dict[int, object] = {}
    try:
        for p in processes:
            try:
                p.start()  # pickles fn and args for the new process
            except (pickle.PicklingError, AttributeError, TypeError) as e:
                raise TypeError(f"fn and args must be picklable: each rank receives them pickled; "
                                f"{type(e).__name__}: {e}") from e
        while len(collected) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                if any(p.exitcode is not None for r, p in enumerate(processes) if r not in collected):  # ended
                    time.sleep(0.5)  # its report may still be in the pipe
                    try:
                        rank, ok, value = results.get(timeout=0.5)
                    except queue.Empty:
                        raise RankFailure(_failure_report({}, results, processes, collected, world_size)) from None
                elif time.monotonic() > deadline:
                    waiting = [r for r in range(world_size) if r not in collected]
                    raise RankFailure(f"ranks {waiting} of {world_size} did not finish within timeout={timeout:g} s "
                                      f"(a rank waiting for a message nobody sends hangs; all were stopped)") from None
                else:
                    continue
            if not ok:
                raise RankFailure(_failure_report({rank: value}, results, processes, collected, world_size))
            try:
                collected[rank] = pickle.loads(value)
            except Exception as e:  # noqa: BLE001 - e.g. a class this process cannot import
                raise RankFailure(f"rank {rank} of {world_size} returned a result this process cannot unpickle "
                                  f"({type(e).__name__}: {e})") from None
    finally:
        started = [p for p in processes if p.pid is not None]
        for p in started:
            if p.is_alive():
                p.terminate()
        for p in started:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return [collected[r] for r in range(world_size)]


def run_many(rank: int, world_size: int, calls: list[tuple[Callable, dict]]) -> list:
    """Run several functions fn(rank, world_size, **kwargs) one after the other in one launch.

    Starting processes costs far more than a small check: `launch(run_many, R, (calls,))` pays once.
    """
    return [fn(rank, world_size, **kwargs) for fn, kwargs in calls]


def demo_failure(rank: int, world_size: int, failing_rank: int = 1, mode: str = "raise") -> str:
    """A launch that goes wrong on purpose: `failing_rank` raises ("raise") or never answers ("hang")
    while the other ranks wait for a message from it. `launch` must report it, never hang."""
    if rank == failing_rank:
        if mode == "raise":
            raise ValueError(f"rank {rank} failed on purpose (demo_failure)")
        time.sleep(3600)  # "hang": a rank stuck in a long computation or a lost message
    Comm().ring_shift(torch.zeros(1))  # waits for the failing rank, which never sends
    return "unreachable"


def check_collectives(rank: int, world_size: int, numel: int = 10) -> dict:
    """Comm's ring all-reduce and all-gather against torch.distributed's own; bytes sent by this rank."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    comm = Comm()
    ours = comm.all_reduce(x)
    sent_all_reduce = comm.sent
    theirs = x.clone()
    dist.all_reduce(theirs)
    gathered = comm.all_gather(x)
    reference = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(reference, x)
    return {"all_reduce error": float((ours - theirs).abs().max()),
            "all_gather error": max(float((a - b).abs().max()) for a, b in zip(gathered, reference, strict=True)),
            "all_reduce sent": sent_all_reduce, "all_gather sent": comm.sent - sent_all_reduce}


def time_steps(step: Callable[[], object], repeats: int = 5, group: dist.ProcessGroup | None = None) -> float:
    """Median seconds of step() over `repeats` runs after one warm-up, all ranks starting together."""
    times = []
    for i in range(repeats + 1):
        dist.barrier(group)
        start = time.perf_counter()
        step()
        dist.barrier(group)  # a step is over when the slowest rank is done
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


_PEER_FAILED = ("closed by peer", "Connection reset", "Broken pipe", "Timed out", "timed out")


def _failure_report(failures: dict[int, str], results, processes: list, collected: dict, world_size: int) -> str:
    """Every failure reported within a second, and every rank that died without a word, the cause first.

    When one rank fails, its neighbours soon fail too ("connection closed by peer"): those are
    listed after the failures that did not come from a peer, so the message starts with the cause.
    A rank whose process ended without reporting (os._exit, a crash, the OOM killer) is named with
    its exit code or signal.
    """
    failures = dict(failures)
    reported = set(collected)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            other, ok, value = results.get(timeout=0.1)
        except queue.Empty:
            if all(p.exitcode is not None for r, p in enumerate(processes) if r not in reported | set(failures)):
                break  # every rank has reported or ended: nothing more will come
            continue
        if ok:
            reported.add(other)
        else:
            failures[other] = value
    reports = {r: f"rank {r} of {world_size} failed:\n{trace}" for r, trace in failures.items()}
    for r, p in enumerate(processes):
        if p.exitcode is not None and r not in reported and r not in failures:
            reports[r] = _death(r, world_size, p.exitcode)
    order = sorted(reports, key=lambda r: (any(p in reports[r] for p in _PEER_FAILED), r))
    return "\n".join(reports[r] for r in order)


def init_from_env() -> tuple[int, int]:
    """Join the group that torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    NCCL when this process has a GPU, gloo otherwise. Returns (rank, world_size).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("RANK and WORLD_SIZE are not set: start this with torchrun "
                           "(python -m torch.distributed.run --nproc-per-node 2 ...), or use launch()")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _world_size_arg(text: str) -> int:
    """argparse's reading of the world_size argument: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer (the number of ranks); got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (the number of ranks); got {value}")
    return value


def _verdict(reports: list[object]) -> tuple[str, int]:
    """Rank 0's report, then every line of another rank that is not ok; exit code 0 only if no line FAILED."""
    lines = str(reports[0]).splitlines()
    for report in reports[1:]:
        lines += [line for line in str(report).splitlines() if not line.startswith("[ok]")]
    failed = any("FAILED" in str(report) for report in reports)
    return "\n".join(lines), 1 if failed else 0


def self_check_main(check: Callable, argv: list[str] | None = None, default_world_size: int = 2) -> int:
    """`python -m course_lib.<module> [world_size]`: run `check(rank, world_size)` on every rank; print the verdict.

    Under torchrun the ranks already exist; otherwise `launch` starts `default_world_size` of them
    (or the number given as the first argument). Prints rank 0's report and every line of the other
    ranks' reports that is not "[ok]"; returns 1 (the exit code) if any rank's report says FAILED
    or a rank fails, 0 otherwise. A bad argument is a usage error (exit code 2); --help prints the usage.
    """
    argv = sys.argv[1:] if argv is None else argv
    module = getattr(check, "__module__", "course_lib.parallel")
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=f"Self-check of {module}: every rank compares its part with the single-device module.")
    parser.add_argument("world_size", nargs="?", type=_world_size_arg, default=default_world_size,
                        help=f"number of ranks to start (default {default_world_size}); under torchrun, "
                             f"its --nproc-per-node decides")
    world_size = parser.parse_args(argv).world_size
    if "RANK" in os.environ:
        rank, world_size = init_from_env()
        torch.manual_seed(0)
        report = check(rank, world_size)
        reports: list[object] = [None] * world_size
        dist.all_gather_object(reports, report)  # every rank's verdict counts, not only rank 0's
        dist.barrier()
        dist.destroy_process_group()
        text, code = _verdict(reports)
        if rank == 0:
            print(text)
        return code
    try:
        reports = launch(check, world_size, timeout=120)
    except RankFailure as failure:
        print(f"[FAILED] R={world_size}: a rank failed\n{failure}")
        return 1
    text, code = _verdict(reports)
    print(text)
    return code


# ----------------------------------------------------------------------------- messages, counted
@dataclass
class Comm:
    """Point-to-point messages and a ring all-reduce over a process group, with every byte counted.

    sent / received: bytes of tensor data this rank sent and received (the payload on the wire,
    not counting the backend's headers). `log` keeps (what, bytes sent, bytes received) per call.
    """

    group: dist.ProcessGroup | None = None
    sent: int = 0
    received: int = 0
    log: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def reset(self) -> None:
        self.sent = self.received = 0
        self.log.clear()

    def _peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + offset) % self.world_size) if self.group else \
            (self.rank + offset) % self.world_size

    def start_ring_shift(self, tensor: torch.Tensor, recv_shape: tuple[int, ...] | None = None,
                         what: str = "ring_shift", offset: int = 1) -> Callable[[], torch.Tensor]:
        """Post the send of `tensor` to rank + offset and the receive from rank - offset; return `wait`.

        wait() blocks until both are done and returns the received tensor (shape recv_shape,
        default tensor's). Between the two calls the messages travel while this rank computes:
        the overlap of communication and computation that ring attention relies on. offset = 1
        (the default) is the ring's step; `all_to_all` uses every offset 1 ... R - 1.
        """
        tensor = tensor.contiguous()
        recv = torch.empty(tensor.shape if recv_shape is None else recv_shape, dtype=tensor.dtype,
                           device=tensor.device)
        if self.world_size == 1 or offset % self.world_size == 0:
            return lambda: tensor.clone()
        ops = [dist.P2POp(dist.irecv, recv, self._peer(-offset), self.group),
               dist.P2POp(dist.isend, tensor, self._peer(offset), self.group)]
        requests = dist.batch_isend_irecv(ops)
        n_sent, n_recv = tensor.numel() * tensor.element_size(), recv.numel() * recv.element_size()
        self.sent += n_sent
        self.received += n_recv
        self.log.append((what, n_sent, n_recv))

        def wait() -> torch.Tensor:
            for request in requests:
                request.wait()
            return recv

        return wait

    def ring_shift(self, tensor: torch.Tensor, recv_shape: tuple[int, ...] | None = None,
                   what: str = "ring_shift", offset: int = 1) -> torch.Tensor:
        """Send `tensor` to rank + offset and return the tensor received from rank - offset (shape recv_shape).

        Every rank calls it at the same time: the R messages go round the ring in one step. The
        receive is posted together with the send, so no rank waits for another to finish first.
        """
        return self.start_ring_shift(tensor, recv_shape, what, offset)()

    def all_to_all(self, chunks: list[torch.Tensor], shapes: list[tuple[int, ...]],
                   what: str = "all_to_all") -> list[torch.Tensor]:
        """Send chunks[j] to rank j; return the chunk each rank sent here, in rank order.

        shapes[j]: the shape of the chunk rank j sends to this rank. R - 1 steps: at step s every
        rank sends to rank r + s and receives from rank r - s (a pairwise exchange, so no rank
        waits on a chain). This rank's own chunk stays here: it sends everything but chunks[r],
        a fraction (R - 1) / R of the data when the chunks are equal.
        """
        R, r = self.world_size, self.rank
        if len(chunks) != R or len(shapes) != R:
            raise ValueError(f"chunks and shapes must have one entry per rank ({R}); got {len(chunks)} and "
                             f"{len(shapes)}")
        received = {r: chunks[r].detach().contiguous()}
        for step in range(1, R):
            source = (r - step) % R
            received[source] = self.ring_shift(chunks[(r + step) % R], tuple(shapes[source]), what=what,
                                               offset=step)
        return [received[j] for j in range(R)]

    def all_gather(self, tensor: torch.Tensor, shapes: list[tuple[int, ...]] | None = None,
                   what: str = "all_gather") -> list[torch.Tensor]:
        """Every rank's `tensor`, in rank order: R - 1 ring steps, each passing on the block last received.

        shapes: the shape each rank's tensor has, when they differ (default: all like this one).
        """
        R, r = self.world_size, self.rank
        shapes = [tuple(tensor.shape)] * R if shapes is None else [tuple(s) for s in shapes]
        blocks = {r: tensor.detach().contiguous()}  # rank -> its block, as they arrive
        for step in range(R - 1):  # receive the block of rank r - step - 1
            source = (r - step - 1) % R
            blocks[source] = self.ring_shift(blocks[(r - step) % R], shapes[source], what=what)
        return [blocks[rank] for rank in range(R)]

    def all_reduce(self, tensor: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
        """The sum of `tensor` over all ranks, by the ring algorithm; returns a new tensor.

        Cut the N elements into R chunks. Reduce-scatter: R - 1 ring steps, each rank passing a
        partial sum of one chunk to its neighbour, which adds its own; afterwards rank r holds the
        full sum of chunk r + 1. All-gather: R - 1 more steps pass the finished chunks round. Each
        step moves one chunk (N / R elements) per rank, so each rank sends 2 (R - 1) N / R elements
        in all, whatever R: almost 2 N, not (R - 1) N as sending everything to everyone would.
        """
        R, r = self.world_size, self.rank
        flat = tensor.detach().contiguous().view(-1).clone()
        if R == 1:
            return flat.view(tensor.shape)
        chunks = list(flat.tensor_split(R))  # views into flat; sizes differ by at most one
        for step in range(R - 1):  # reduce-scatter
            send_i, recv_i = (r - step) % R, (r - step - 1) % R
            got = self.ring_shift(chunks[send_i], tuple(chunks[recv_i].shape), what=f"{what} (reduce-scatter)")
            chunks[recv_i] += got
        for step in range(R - 1):  # all-gather: rank r owns the finished chunk (r + 1) % R
            send_i, recv_i = (r + 1 - step) % R, (r - step) % R
            chunks[recv_i].copy_(self.ring_shift(chunks[send_i], tuple(chunks[recv_i].shape),
                                                 what=f"{what} (all-gather)"))
        return flat.view(tensor.shape)


def ring_allreduce_bytes(numel: int, world_size: int, element_size: int, rank: int | None = None) -> int:
    """Bytes rank `rank` sends in `Comm.all_reduce` of `numel` elements: exactly what it sends.

    The N elements are cut into R chunks as torch.tensor_split cuts them (sizes differ by at most
    one); rank r sends every chunk but chunk r + 1 in the reduce-scatter and every chunk but chunk
    r + 2 in the all-gather. When R divides N every rank sends 2 (R - 1) N / R elements and `rank`
    may be left out; otherwise the ranks send different amounts and `rank` must be given (a
    ValueError says so rather than a count no rank sends).
    """
    numel = check_nonnegative_int("numel", numel)
    R = check_positive_int("world_size", world_size)
    element_size = check_positive_int("element_size", element_size)
    if rank is None:
        if numel % R:
            raise ValueError(f"numel={numel} is not divisible by world_size={R}: the ranks' chunks differ in size "
                             f"and so do the bytes they send; pass rank=0 ... {R - 1}")
        return 2 * (R - 1) * (numel // R) * element_size
    rank = check_nonnegative_int("rank", rank)
    if rank >= R:
        raise ValueError(f"rank must be in 0 ... {R - 1} (world_size={R}); got {rank}")
    if R == 1:
        return 0
    sizes = [numel // R + (1 if i < numel % R else 0) for i in range(R)]  # torch.tensor_split's chunks
    return (2 * numel - sizes[(rank + 1) % R] - sizes[(rank + 2) % R]) * element_size


def saved_bytes(fn: Callable[[], object], exclude: tuple[torch.Tensor, ...] = ()) -> tuple[object, int]:
    """Run fn(); return (its result, bytes of the distinct tensors autograd saved for the backward pass).

    Tensors that share storage are counted once (a view of a saved tensor costs nothing more).
    exclude: tensors not to count (the parameters, which exist before the call; the inputs).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())
