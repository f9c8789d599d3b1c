"""Tensor parallelism on one node: the rank's group, how tensors are cut per rank, and the worker processes.

What belongs here:
- `TPGroup`: this process's rank and world size and the two collectives the model needs (one all-reduce per mixer
  and per MLP; the vocab-parallel logits gather). World 1 is the single-process engine: no collectives at all.
- Pure sharding arithmetic (`split_range`, `segments`, `kv_head_range`, `vocab_range`, `shard`) and
  `shard_config` (the shapes one rank holds), used by the model and the weight loader alike.
- `check_tp_size`: the up-front divisibility check, run before any process starts.
- `TPWorkers`: ranks 1..N-1 as spawned processes. Rank 0 is the calling process: it schedules, sends each step's
  `StepPlan` (host lists only) to every worker over a pipe, runs its own shard and samples. gloo on CPU; on CUDA
  the same code with the nccl backend and device = rank.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.connection import wait as wait_any
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..config import ModelConfig

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a peer that died mid-step turns a hang into an error


class TPGroup:
    """One rank of a tensor-parallel group (rank 0 of world 1: the single-process engine)."""

    def __init__(self, rank: int = 0, world: int = 1, group=None):
        self.rank, self.world, self.group = rank, world, group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x: a rank's partial sum (row-parallel output) -> the full sum, in place, on every rank."""
        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """local: [M, rows of this rank's vocab_range] -> [M, vocab_size] on every rank (shards padded to one width
        for the all-gather when vocab_size does not divide)."""
        if self.world == 1:
            return local
        width = -(-vocab_size // self.world)
        padded = torch.nn.functional.pad(local, (0, width - local.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts, dim=1)[:, :vocab_size]

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (e.g. KV blocks that fit on every device)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


SINGLE = TPGroup()


# ---------------------------------------------------------------- sharding arithmetic (pure)

def split_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """The rank's [start, stop) of `size` items split evenly (check_tp_size guarantees world divides size)."""
    if size % world:
        raise ValueError(f"{size} items do not split evenly over {world} ranks")
    n = size // world
    return rank * n, (rank + 1) * n


def segments(sizes: list[int], rank: int, world: int) -> list[tuple[int, int]]:
    """A dim made of consecutive segments (e.g. GDN's [q | k | v] channels) -> the rank's range in each segment."""
    out, start = [], 0
    for size in sizes:
        a, b = split_range(size, rank, world)
        out.append((start + a, start + b))
        start += size
    return out


def kv_head_range(num_kv_heads: int, rank: int, world: int) -> tuple[int, int]:
    """KV heads a rank holds: its share when world divides them, else (world a multiple of them) the one KV head
    its query heads attend with (replicated over world / num_kv_heads ranks)."""
    if num_kv_heads >= world:
        return split_range(num_kv_heads, rank, world)
    h = rank * num_kv_heads // world
    return h, h + 1


def vocab_range(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """The rank's rows of the vocab-parallel lm_head: ceil-sized shards, the last one shorter when uneven."""
    width = -(-vocab_size // world)
    return min(rank * width, vocab_size), min((rank + 1) * width, vocab_size)


def shard(tensor, dim: int, rank: int, world: int):
    """The rank's even share of `tensor` along `dim` (a torch tensor or a safetensors slice)."""
    a, b = split_range(_shape(tensor)[dim], rank, world)
    return tensor[(slice(None),) * dim + (slice(a, b),)]


def read_ranges(tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Rows `ranges` of `tensor` along `dim`, concatenated (reads only those bytes from a safetensors slice)."""
    # no ranges: a zero-width cut (e.g. the scales of a 0-channel shared expert) reads nothing, an empty slice
    parts = [tensor[(slice(None),) * dim + (slice(a, b),)] for a, b in ranges or [(0, 0)]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _shape(tensor) -> list[int]:
    return list(tensor.shape) if isinstance(tensor, torch.Tensor) else list(tensor.get_shape())


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The shapes one of `world` ranks holds: its attention, GDN and KV heads and its MLP / expert columns, or under
    expert parallelism its whole experts (expert_shards = world; num_experts stays the router's E). vocab_size stays
    whole: the embedding and lm_head hold the rows of vocab_range."""
    if world == 1:
        return cfg
    ep = cfg.expert_parallel and cfg.is_moe
    return dataclasses.replace(
        cfg, num_attention_heads=cfg.num_attention_heads // world,
        num_key_value_heads=max(1, cfg.num_key_value_heads // world),
        linear_num_key_heads=cfg.linear_num_key_heads // world,
        linear_num_value_heads=cfg.linear_num_value_heads // world,
        intermediate_size=cfg.intermediate_size // world,
        moe_intermediate_size=cfg.moe_intermediate_size if ep else cfg.moe_intermediate_size // world,
        expert_shards=world if ep else 1, shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // world)


def expert_range(cfg: ModelConfig, rank: int) -> tuple[int, int]:
    """The router ids [start, stop) of the experts rank `rank` holds (cfg: its shard_config): all of them, or under
    expert parallelism its num_local_experts consecutive ones."""
    if cfg.expert_shards == 1:
        return 0, cfg.num_experts
    return split_range(cfg.num_experts, rank, cfg.expert_shards)


# ---------------------------------------------------------------- up-front checks

def _divides(field: str, value: int, world: int) -> str | None:
    if value % world:
        return f"tensor_parallel_size={world} does not divide {field}={value}"
    return None


def _no_problems(world: int) -> list[str]:
    return []


def _tp_problems(cfg: ModelConfig, world: int, extra: Callable[[int], list[str]] = _no_problems) -> list[str]:
    fields = [("num_attention_heads", cfg.num_attention_heads), ("linear_num_key_heads", cfg.linear_num_key_heads),
              ("linear_num_value_heads", cfg.linear_num_value_heads)]
    # expert parallel: whole experts per rank, each expert's columns stay whole
    experts = ("num_experts", cfg.num_experts) if cfg.expert_parallel else \
        ("moe_intermediate_size", cfg.moe_intermediate_size)
    fields += ([experts, ("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size)] if cfg.is_moe
               else [("intermediate_size", cfg.intermediate_size)])
    problems = [p for f, v in fields if (p := _divides(f, v, world))]
    hkv = cfg.num_key_value_heads
    if hkv % world and world % hkv:
        problems.append(f"tensor_parallel_size={world} neither divides nor is a multiple of num_key_value_heads={hkv}")
    return problems or extra(world)  # extra assumes the heads and sizes divide


def valid_tp_sizes(cfg: ModelConfig, extra: Callable[[int], list[str]] = _no_problems) -> list[int]:
    return [n for n in range(1, cfg.num_attention_heads + 1) if not _tp_problems(cfg, n, extra)]


def check_tp_size(cfg: ModelConfig, world: int, device: torch.device,
                  extra: Callable[[int], list[str]] = _no_problems) -> None:
    """Raise ValueError (one sentence naming the field and the valid sizes) unless `world` ranks can shard cfg.
    extra(world): further reasons, e.g. a quantized checkpoint's packing and groups (models/formats.tp_problems)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {world!r}")
    problems = _tp_problems(cfg, world, extra)
    if problems:
        sizes = ", ".join(map(str, valid_tp_sizes(cfg, extra)))
        raise ValueError(f"{problems[0]}; valid sizes: {sizes}")
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={world} needs {world} CUDA devices but {torch.cuda.device_count()} "
                         f"are visible; lower --tp")
    if world > 1 and dist.is_initialized():
        if _owned_group:
            raise ValueError("another tensor-parallel LLM of this process still holds its process group (one per "
                             "process); shut it down first (llm.shutdown())")
        raise ValueError("tensor_parallel_size > 1 starts its own process group, but torch.distributed is already "
                         "initialised in this process; run deltaserve outside torchrun")


# ---------------------------------------------------------------- processes

def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _collective_device(group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else \
        torch.device("cpu")


_owned_group = False  # this process's process group, if any, was started by init_group (not by torchrun)


def init_group(rank: int, world: int, port: int, device: torch.device) -> TPGroup:
    global _owned_group
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    _owned_group = True
    dist.init_process_group(backend_for(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return TPGroup(rank, world, dist.group.WORLD)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world: int, port: int, spec, conn) -> None:
    """A rank > 0: build the same engine shard as rank 0, then run every StepPlan rank 0 sends until None/EOF."""
    # Ctrl-C reaches the terminal's whole process group; rank 0 alone decides when the workers stop (TPWorkers.close),
    # so a worker never leaves a step part-way on its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(("started", None))  # before the rendezvous, which rank 0 would otherwise wait on for a dead worker
    if os.environ.get(_TEST_EXIT_ENV) == f"rank{rank}-before-rendezvous":  # TEST-ONLY: a worker lost right here
        os._exit(3)
    try:
        device = rank_device(torch.device(spec.device), rank)
        if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # N ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        tp = init_group(rank, world, port, device)
        runner = spec.build_runner(tp, device, on_loaded=lambda: conn.send(("loaded", None)))
        conn.send(("ready", None))
    except BaseException as e:  # reported to rank 0, which raises it there
        conn.send(("error", _describe(e)))
        return
    try:
        while True:
            try:
                plan = conn.recv()
            except EOFError:  # rank 0 is gone
                break
            if plan is None:
                break
            try:
                runner.run_plan(plan)
            except BaseException as e:
                # rank 0 is inside this step's collectives and never joins a teardown: report and go now (its
                # collective then fails on the closed connection instead of waiting for the timeout)
                traceback.print_exc()
                conn.send(("error", _describe(e)))
                os._exit(1)
    finally:
        runner.release_graphs()  # before the teardown, which a graph holding collectives blocks
        leave_group(timeout=10.0)


_TEST_EXIT_ENV = "DELTASERVE_TEST_TP_EXIT"  # tests: "rank<N>-before-rendezvous" makes that worker exit there


def _describe(e: BaseException) -> str:
    return f"{e}" if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


@contextmanager
def sigint_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it. Rank 0 runs each step's share of the collectives
    in such a block: a KeyboardInterrupt part-way would leave the workers inside that step, out of step with rank 0
    for good. Off the main thread (Python runs signal handlers only there) this does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # None: a handler installed outside Python, which could not be put back
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:  # delivered even when the block raised: the Ctrl-C then wins, with that error as its context
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):
            previous(signal.SIGINT, held[0])
        elif held and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C (SIGINT) while a worker process is started: it starts with SIGINT ignored (kept across exec, and
    Python then installs no KeyboardInterrupt handler), so a Ctrl-C during its imports (a second or more of torch,
    before _worker_main ignores SIGINT itself) is no traceback from it; rank 0 alone answers the Ctrl-C. A Ctrl-C
    during p.start() itself (the fork and exec) is lost. Off the main thread (where signal.signal fails) nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class TPWorkers:
    """Ranks 1..world-1 as spawned processes, each with a pipe from rank 0 (steps in, start-up status out)."""

    def __init__(self, world: int, spec):
        ctx = mp.get_context("spawn")
        self.port = _free_port()
        self.conns, self.procs = [], []
        for rank in range(1, world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(rank, world, self.port, spec, child), daemon=True,
                            name=f"deltaserve-tp{rank}")
            with _sigint_ignored():
                p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.closed = False
        self._early: list[list] = [[] for _ in self.conns]  # start-up messages read while watching the rendezvous
        self.broken: str | None = None  # why the group cannot run again (failure())
        self.before_leave: Callable[[], None] | None = None  # rank 0's ModelRunner.release_graphs
        self.lost = threading.Event()  # set by the watchdog (watch()): a worker exited outside close()
        self._watcher: threading.Thread | None = None
        self._leaving = threading.Lock()  # a worker lost (the watchdog) or asked to exit (closed): decided once

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def rendezvous(self, join: Callable[[], TPGroup]) -> TPGroup:
        """Run rank 0's side of the group's rendezvous (`join`) while watching the workers: one that exits or reports
        an error before joining ends the wait at once (the rendezvous itself would wait COLLECTIVE_TIMEOUT for it).
        The abandoned join stays blocked in its daemon thread until that timeout."""
        done: list = []

        def run() -> None:
            try:
                done.append((join(), None))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                done.append((None, e))

        t = threading.Thread(target=run, daemon=True, name="deltaserve-tp-rendezvous")
        t.start()
        while t.is_alive():
            t.join(0.1)
            for rank, (conn, p) in enumerate(zip(self.conns, self.procs), start=1):
                if conn.poll():  # before the rendezvous ends only an error (or EOF) can come; keep anything else
                    self._early[rank - 1].append(self._recv_or_exit(rank, "joining the process group"))
                    if self._early[rank - 1][-1][0] == "error":
                        raise ValueError(f"tensor-parallel rank {rank}: {self._early[rank - 1][-1][1]}")
                elif p.exitcode is not None:
                    raise RuntimeError(f"tensor-parallel worker {rank} exited while joining the process group (exit "
                                       f"code {p.exitcode}); see its output above")
        group, error = done[0]
        if error is not None:
            raise error
        return group

    def _recv_or_exit(self, rank: int, during: str) -> tuple:
        conn, p = self.conns[rank - 1], self.procs[rank - 1]
        try:
            return conn.recv()
        except EOFError:
            p.join(2.0)
            raise RuntimeError(f"tensor-parallel worker {rank} exited while {during} (exit code {p.exitcode}); see "
                               f"its output above") from None

    def wait_for(self, status: str) -> None:
        """Block until every worker reports `status`; a worker's error is raised here as ValueError."""
        for rank, (conn, p) in enumerate(zip(self.conns, self.procs), start=1):
            try:
                kind, msg = self._early[rank - 1].pop(0) if self._early[rank - 1] else conn.recv()
            except EOFError:
                p.join(2.0)
                hint = "" if status != "started" else (
                    " before running any deltaserve code: if the script makes the LLM at import time, put that under "
                    "`if __name__ == '__main__':` (each worker is a new Python process that imports the script)")
                raise RuntimeError(f"tensor-parallel worker {rank} exited during start-up (exit code {p.exitcode})"
                                   f"{hint}") from None
            if kind == "error":
                raise ValueError(f"tensor-parallel rank {rank}: {msg}")
            if kind != status:
                raise RuntimeError(f"tensor-parallel worker {rank} sent {kind!r} while starting, expected {status!r}")

    def watch(self) -> None:
        """Start the watchdog, once every worker is ready. An NCCL all-reduce whose peer has died spins on rank 0's
        GPU until COLLECTIVE_TIMEOUT (10 minutes) while rank 0 waits for the step's samples: a worker that exits outside
        close() (an error in its step, a crash, the OOM killer) makes the watchdog abort the communicator, which ends
        those kernels at once, and check_step() then refuses what the step computed. (gloo's collectives fail by
        themselves on the closed connection.)"""
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="deltaserve-tp-watch")
        self._watcher.start()

    def _watch(self) -> None:
        wait_any([p.sentinel for p in self.procs])  # returns once any worker has exited
        with self._leaving:
            if self.closed:  # close() or _kill(): the exit was asked for
                return
            self.lost.set()
        # not under the lock: the abort ends the kernels at once but itself returns only after rank 0's decode graphs
        # are destroyed (they hold its collectives, as in leave_group), which _kill does
        self._abort_group()

    @staticmethod
    def _abort_group() -> None:
        """End rank 0's side of every collective, kernels waiting on a dead peer included (NCCL's abort; the group is
        gone afterwards, so there is nothing left to leave)."""
        if dist.is_initialized() and dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()

    def check_step(self) -> None:
        """Raise if a worker exited while the step ran: its all-reduces were aborted, so its results are garbage.
        (The caller then asks failure() for the worker's own error.)"""
        if self.lost.is_set():
            raise RuntimeError("a tensor-parallel worker exited during the step")

    def send(self, plan) -> None:
        for conn in self.conns:
            conn.send(plan)

    def run_step(self, plan, run: Callable):
        """Send `plan` to every worker and run rank 0's share, `run(plan)`, alongside them -> what `run` returns.
        Ctrl-C is held until rank 0's share is done, so it lands between steps, where the ranks agree. Any other
        error part-way leaves the workers inside the step's collectives, which the next step's would pair with (a
        gloo size mismatch; under NCCL, sums of the wrong tensors): the group is abandoned and the error raised."""
        with sigint_held():
            try:
                self.send(plan)
                return run(plan)
            except BaseException as e:
                self.abandon(f"a step failed part-way on rank 0 ({_describe(e)}), leaving the ranks out of step")
                raise

    def failure(self, wait: float = 0.0) -> str | None:
        """Why this group can no longer run a step (a worker failed or exited, a step was abandoned, or close() was
        called), else None; a cause, once found, is kept. wait: give a worker that is going down (after a failed
        collective) this long, in all, to exit first."""
        if self.broken is None and not self.closed:
            self.broken = self._worker_error() or self._exited(wait)
        if self.broken is not None:
            return self.broken
        return "its tensor-parallel workers were shut down" if self.closed else None

    def _worker_error(self) -> str | None:
        """The first error a worker reported from a step (it exits right after), else None."""
        for rank, (conn, p) in enumerate(zip(self.conns, self.procs), start=1):
            try:
                if not conn.poll():
                    continue
                kind, msg = conn.recv()
            except (EOFError, OSError):
                continue
            if kind == "error":
                return f"tensor-parallel worker {rank} (pid {p.pid}) failed: {msg}"
        return None

    def _exited(self, wait: float) -> str | None:
        deadline = time.monotonic() + wait
        for rank, p in enumerate(self.procs, start=1):
            p.join(max(0.0, deadline - time.monotonic()))
            if not p.is_alive():
                return self._worker_error() or f"tensor-parallel worker {rank} (pid {p.pid}) exited with code " \
                                                f"{p.exitcode}"
        return None

    def abandon(self, reason: str) -> None:
        """Give up on the group after a step went wrong part-way. failure() says why from then on: a worker's own
        error or exit when there was one (what made rank 0's step fail), else `reason`."""
        if self.closed:
            return
        if self.failure(wait=0.5) is None:
            self.broken = reason
        self._kill()

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker (idempotent): ask them to leave, leave the process group alongside them, wait, then
        terminate stragglers. Leaving together matters: NCCL's communicator teardown waits for every rank, so rank 0
        destroying its group only after the workers exited (or they only after rank 0 did) hangs for good."""
        if self.closed:
            return
        if self.failure() is not None:  # a broken group cannot leave together
            self._kill()
            return
        with self._leaving:
            self.closed = True
        if self.lost.is_set():  # a worker died just before: the watchdog is aborting, nobody can leave together
            self._kill()
            return
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        self._release_rank0()
        leave_group(timeout)
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(timeout)
        for conn in self.conns:
            conn.close()

    def _kill(self) -> None:
        """Stop a broken group now: its workers may be stuck in a step's collectives, where they can neither run the
        next step nor join a graceful teardown."""
        with self._leaving:
            self.closed = True
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5.0)
        for conn in self.conns:
            conn.close()
        self._release_rank0()
        if self.lost.is_set():  # the watchdog's NCCL abort tears the group down; it can finish now the graphs are gone
            self._watcher.join(10.0)
        leave_group(timeout=2.0)  # rank 0's side of the group (gloo's, or nothing after an abort); its dead peers
        # never join the teardown

    def _release_rank0(self) -> None:
        if self.before_leave is not None:
            try:
                self.before_leave()
            except Exception:  # noqa: BLE001 - a broken device must not stop the workers from being stopped
                pass


def leave_group(timeout: float) -> None:
    """destroy_process_group, given up on after `timeout` s (a peer that already died never joins the teardown)."""
    if not dist.is_initialized():
        return
    global _owned_group
    t = threading.Thread(target=dist.destroy_process_group, daemon=True, name="deltaserve-tp-leave")
    t.start()
    t.join(timeout)
    _owned_group = dist.is_initialized()


def worker_pids_alive(pids: list[int]) -> list[int]:
    """Of `pids`, those still running (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] != "Z":
                    alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


__all__ = ["TPGroup", "SINGLE", "TPWorkers", "check_tp_size", "shard_config", "shard", "split_range", "segments",
           "kv_head_range", "vocab_range", "read_ranges", "init_group", "rank_device", "valid_tp_sizes",
           "worker_pids_alive", "expert_range", "sigint_held"]
