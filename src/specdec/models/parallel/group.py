"""The tensor-parallel process group: how its ranks meet, how rank 0 talks to them, and how a dead
rank ends the run instead of hanging it.

Two ways in, one protocol (torchrun's environment rendezvous: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT):

- `TPGroup.launch`: the calling process becomes rank 0. It hosts the rendezvous store on a free
  loopback port and starts the other ranks as `python -m specdec.models.parallel.worker`
  subprocesses on this machine (a fresh interpreter, so a caller's script or notebook is never
  re-imported, as multiprocessing's spawn would do).
- `TPGroup.join_from_env`: the process was started by torchrun (or any launcher that sets those
  variables, several nodes included); it joins torch.distributed's `env://` rendezvous.

Rank 0 sends each rank the calls to replay as a small JSON message under a numbered key of the
rendezvous store (`publish` / `receive`); the model's own all-reduces are the only collectives,
so the backend (gloo on CPU, NCCL on CUDA) carries no control traffic and an idle rank waits on a
store key, not on a collective that would time out. The last rank to replay a message deletes it.

Failures: a rank that raises reports its error under `error/<rank>` before exiting; rank 0 watches
the ranks it started (a thread polls them) and, when one dies, stops the others and fails the next
call, or the call in flight: gloo raises at once when a peer's socket closes. Should a call stay
blocked anyway (NCCL waits for its timeout), the watchdog prints the reason and ends the process
after a few seconds: a clear death rather than a hang. Workers started here also exit when rank 0
goes away (the store's connection closes, or their parent process changes).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any

# torch is imported where it is used: the CLI imports this module's error type and
# close_open_groups before it knows whether the command needs torch at all.

WORKER_MODULE = "specdec.models.parallel.worker"
WORKER_ARGS_ENV = "SPECDEC_TP_WORKER"
"""The JSON arguments of a worker started by `TPGroup.launch` (what to load, how)."""
PARENT_PID_ENV = "SPECDEC_TP_PARENT"
KEY_PREFIX = "specdec/tp/"
PG_TIMEOUT = timedelta(minutes=10)
"""How long a collective (or joining the group) waits for a rank that is alive but silent."""
STARTUP_TIMEOUT_S = 600.0
"""How long rank 0 waits for its workers to start and load (a big checkpoint loads slowly)."""
_GRACE_S = 5.0
_POLL_S = 0.2


class TensorParallelError(RuntimeError):
    """A rank of the tensor-parallel group failed or cannot be started; the message says which and why."""


def backend_for(device_type: str) -> str:
    """torch.distributed's backend for a device type: gloo on CPU, NCCL on CUDA (a clear error when missing)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise TensorParallelError("tensor parallelism needs torch.distributed, which this torch build does not have")
    if device_type == "cuda":
        if not dist.is_nccl_available():
            raise TensorParallelError("tensor parallelism on CUDA needs the NCCL backend, which this torch build "
                                      "does not have (install a CUDA build of torch)")
        return "nccl"
    if device_type == "cpu":
        if not dist.is_gloo_available():
            raise TensorParallelError("tensor parallelism on the CPU needs the gloo backend, which this torch build "
                                      "does not have")
        return "gloo"
    raise TensorParallelError(f"tensor parallelism runs on cpu (gloo) or cuda (NCCL), not on {device_type}")


def launched_by_torchrun() -> bool:
    """True when this process is one rank of several started by torchrun (or a launcher like it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


_OPEN: "weakref.WeakSet[TPGroup]" = weakref.WeakSet()


def close_open_groups() -> None:
    """Close every group this process still holds (a command's end: its other ranks stop with it)."""
    for group in list(_OPEN):
        group.close()


class TPGroup:
    """This process's place in a tensor-parallel group: rank, world size, the command channel and,
    on a rank 0 that started its workers, those workers."""

    def __init__(self, rank: int, world_size: int, device_type: str, store: Any) -> None:
        import torch.distributed as dist

        self.rank, self.world_size, self.device_type = rank, world_size, device_type
        self.backend = backend_for(device_type)
        self.store = dist.PrefixStore(KEY_PREFIX, store)
        self._root_store = store  # keeps a store we host alive as long as the group
        self.workers: list[subprocess.Popen] = []  # rank r + 1 at index r (on a rank 0 that started them)
        self.failure: str | None = None
        """Why the group is unusable (a rank died, or reported an error); None while healthy."""
        self.exit_on_failure = False
        """End the process as soon as a rank dies, even while idle (the command line sets it; a library caller
        gets the error from its next call instead)."""
        self.closed = False
        self._seq = 0
        self._busy = 0  # > 0 while rank 0 is inside a call that may block on the other ranks
        self._acknowledged = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._pg_ready = False
        _OPEN.add(self)

    # ---- starting ------------------------------------------------------------------------------
    @classmethod
    def launch(cls, size: int, device_type: str, worker_args: dict[str, Any]) -> "TPGroup":
        """Become rank 0 of a new group of `size` ranks on this machine, starting ranks 1 … size-1."""
        import torch.distributed as dist

        backend_for(device_type)  # a missing backend fails before anything starts
        store = dist.TCPStore("127.0.0.1", 0, size, True, PG_TIMEOUT, wait_for_workers=False)
        group = cls(0, size, device_type, store)
        group.broadcast_text("ready", "")  # rank 0 checked the model before calling this
        # Workers import the very specdec this process runs (a source tree first on sys.path included).
        src_root = str(Path(__file__).resolve().parents[3])
        for rank in range(1, size):
            env = dict(os.environ)
            env.update({
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
                "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                WORKER_ARGS_ENV: json.dumps(worker_args), PARENT_PID_ENV: str(os.getpid()),
                "PYTHONPATH": os.pathsep.join([src_root] + [p for p in [env.get("PYTHONPATH")] if p]),
            })
            # Their stdout stays out of this process's (a --json answer); errors go to the shared stderr.
            group.workers.append(subprocess.Popen([sys.executable, "-m", WORKER_MODULE], env=env,
                                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        group._start_watchdog()
        atexit.register(group.close)
        return group

    @classmethod
    def join_from_env(cls, size: int, device_type: str) -> "TPGroup":
        """Join the group described by torchrun's environment variables (RANK, WORLD_SIZE, MASTER_ADDR …)."""
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != size:
            raise TensorParallelError(
                f"the launcher started {world} processes (WORLD_SIZE) but the tensor-parallel size is {size}; "
                f"they must be equal (pass --tensor-parallel-size {world})"
            )
        backend_for(device_type)
        store, rank, _ = next(dist.rendezvous("env://", timeout=PG_TIMEOUT))  # torchrun's, or the one `launch` hosts
        group = cls(rank, size, device_type, store)
        if rank == 0:
            atexit.register(group.close)
        elif PARENT_PID_ENV in os.environ:
            group._watch_parent(int(os.environ[PARENT_PID_ENV]))
        return group

    def init_process_group(self, local_rank: int) -> None:
        """Initialise torch.distributed's default group over the rendezvous store (transformers then finds it)."""
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            raise TensorParallelError("torch.distributed is already initialised in this process; specdec runs one "
                                      "tensor-parallel target per process (close the other pipeline first)")
        device_id = None
        if self.device_type == "cuda":
            torch.cuda.set_device(local_rank)
            device_id = torch.device("cuda", local_rank)
        self._busy += 1
        try:
            dist.init_process_group(self.backend, store=dist.PrefixStore("pg/", self.store), rank=self.rank,
                                    world_size=self.world_size, timeout=PG_TIMEOUT, device_id=device_id)
        except Exception as exc:
            raise self.failure_error(exc) from exc
        finally:
            self._busy -= 1
        self._pg_ready = True

    # ---- small handshakes over the store ------------------------------------------------------
    def announce(self, key: str, error: str = "") -> None:
        """Tell rank 0 this rank reached `key` ("" = fine; otherwise the error that stopped it)."""
        self.store.set(f"{key}/{self.rank}", error)

    def wait_for(self, key: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """On rank 0: wait until every other rank announced `key`, failing early with the reason when one
        reports an error or dies (so a worker that crashes while starting never leaves rank 0 waiting)."""
        pending = set(range(1, self.world_size))
        deadline = time.monotonic() + timeout_s
        while pending:
            for rank in sorted(pending):
                if self.store.check([f"{key}/{rank}"]):  # non-blocking
                    error = self.store.get(f"{key}/{rank}").decode()
                    if error:
                        self.fail(f"tensor-parallel rank {rank} failed: {error}")
                        raise TensorParallelError(self.failure or error)
                    pending.discard(rank)
            if self.failure:
                raise TensorParallelError(self.failure)
            if pending and time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel ranks {sorted(pending)} did not reach '{key}' within "
                                          f"{timeout_s:.0f} s")
            if pending:
                time.sleep(0.05)

    def broadcast_text(self, key: str, text: str | None = None) -> str:
        """Rank 0 sets `key` to `text`; every other rank waits for it and returns it."""
        if self.rank == 0:
            self.store.set(key, text or "")
            return text or ""
        self.store.wait([key], STARTUP_TIMEOUT_S * 6)  # rank 0 may be converting a checkpoint first
        return self.store.get(key).decode()

    # ---- the command channel ------------------------------------------------------------------
    def publish(self, ops: list[list[Any]]) -> int:
        """On rank 0: send the next message (a list of calls) to every other rank; returns its number."""
        self.check()
        self._seq += 1
        self.store.set(f"cmd/{self._seq}", json.dumps(ops))
        return self._seq

    def done(self, seq: int) -> None:
        """On ranks ≥ 1, after replaying message `seq`: the last rank to get there deletes it. This runs while
        rank 0 verifies and drafts, off the decoding loop's path."""
        if self.store.add(f"read/{seq}", 1) == self.world_size - 1:
            self.store.delete_key(f"cmd/{seq}")
            self.store.delete_key(f"read/{seq}")

    def receive(self) -> tuple[int, list[list[Any]]]:
        """On ranks ≥ 1: block until rank 0 publishes the next message; its number and its calls."""
        import torch.distributed as dist

        self._seq += 1
        key = f"cmd/{self._seq}"
        while True:
            try:
                # Idle time is unbounded (a server between requests): wait in long slices.
                self.store.wait([key], timedelta(hours=1))
                return self._seq, json.loads(self.store.get(key))
            except dist.DistStoreError as exc:
                if "timeout" not in str(exc).lower():
                    raise

    @property
    def calls(self) -> "_Busy":
        """Context for a call on rank 0 that involves the other ranks (the watchdog knows it may block)."""
        return _Busy(self)

    # ---- failures --------------------------------------------------------------------------------
    def check(self) -> None:
        if self.failure:
            raise TensorParallelError(self.failure)
        if self.closed:
            raise TensorParallelError("the tensor-parallel group is closed (its pipeline was closed)")

    def fail(self, reason: str) -> None:
        """Mark the group unusable and stop the workers this process started."""
        if self.failure is None:
            self.failure = reason
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()

    def failure_error(self, exc: BaseException) -> TensorParallelError:
        """The clear error for a collective or store call that failed because a rank went away."""
        if isinstance(exc, TensorParallelError):
            return exc
        self._acknowledged.set()
        if self.rank_failure() is None:
            self.fail(f"the tensor-parallel group failed ({_first_line(exc)}); another rank probably died, see its log")
        return TensorParallelError(self.failure)

    def rank_failure(self, wait_s: float = 2.0) -> str | None:
        """Why a rank failed, waiting up to `wait_s` for the watchdog to see an exit or a rank to post its
        error (a collective usually fails a moment before the dead process is reaped); None if none did."""
        deadline = time.monotonic() + wait_s
        while self.failure is None and time.monotonic() < deadline:
            if not self.workers and self._diagnosis():  # torchrun's ranks: only what they posted is known
                self.fail(f"tensor-parallel {self._diagnosis()}")
            else:
                time.sleep(_POLL_S)
        return self.failure

    def _diagnosis(self) -> str:
        """What is known of failed ranks: the exits of the workers started here and the errors ranks posted."""
        parts = []
        for rank, proc in enumerate(self.workers, start=1):
            code = proc.poll()
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                parts.append(f"worker rank {rank} (pid {proc.pid}) {how}")
        try:
            for rank in range(1, self.world_size):
                if self.store.check([f"error/{rank}"]):
                    error = self.store.get(f"error/{rank}").decode()
                    parts.append(f"rank {rank} reported {error[:160]}" + ("…" if len(error) > 160 else ""))
        except Exception:  # the store itself is gone: nothing more to learn from it
            pass
        return "; ".join(parts)

    def _start_watchdog(self) -> None:
        def watch() -> None:
            while not self.closed and self.failure is None:
                if any(proc.poll() is not None for proc in self.workers) and not self.closed:
                    self.fail(f"tensor-parallel {self._diagnosis()}; the run cannot go on")
                    break
                time.sleep(_POLL_S)
            if self.closed:
                return
            # A gloo call in flight raises by itself; one that stays blocked (NCCL) would wait for its timeout.
            if self._busy and not self._acknowledged.wait(_GRACE_S) and self._busy:
                self._die()
            # A command gets a moment to report the error itself and end (closing the group); a server
            # would otherwise go on answering every request with it.
            deadline = time.monotonic() + _GRACE_S
            while self.exit_on_failure and not self.closed:
                if time.monotonic() > deadline:
                    self._die()
                time.sleep(_POLL_S)

        self._watchdog = threading.Thread(target=watch, name="specdec-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _die(self) -> None:
        print(f"specdec: error: {self.failure}", file=sys.stderr, flush=True)
        os._exit(1)

    def _watch_parent(self, parent: int) -> None:
        """A worker whose rank 0 (its parent) is gone exits, even from inside a blocked collective."""
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="specdec-tp-parent", daemon=True).start()

    # ---- ending ----------------------------------------------------------------------------------
    def close(self) -> None:
        """On rank 0: tell the other ranks to stop, wait for the workers started here, leave torch.distributed."""
        import torch.distributed as dist

        if self.closed:
            return
        healthy = self.failure is None
        if self.rank == 0 and healthy and self._pg_ready:
            try:
                self.publish([["stop"]])
            except Exception:  # a store that is gone: the workers exit on their own
                healthy = False
        self.closed = True
        _OPEN.discard(self)
        for proc in self.workers:
            try:
                proc.wait(timeout=30 if healthy else 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._pg_ready and dist.is_initialized():
            dist.destroy_process_group()
        self._pg_ready = False


class _Busy:
    def __init__(self, group: TPGroup) -> None:
        self.group = group

    def __enter__(self) -> None:
        self.group.check()
        self.group._busy += 1

    def __exit__(self, *exc: Any) -> None:
        self.group._busy -= 1
