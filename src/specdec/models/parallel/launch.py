"""Starting a tensor-parallel target: the checks that refuse a bad setup before any process starts,
and the start-up every rank goes through.

    rank 0                                   ranks 1 … N-1 (started here, or by torchrun)
    prepare the checkpoint, check the plan   wait for rank 0's "ready" (or its refusal)
    "ready"  ──────────────────────────────► "hello"
    join the process group  ◄──────────────► join the process group
    load its shard (same loader)             load its shard, announce "loaded" (or the error)
    ShardedTarget: drives the decoding loop  follow: replay rank 0's calls until "stop"

Every rank loads through `models.hub.load_model(..., tensor_parallel_size=N)`, i.e. transformers'
`from_pretrained` with the model's tensor-parallel plan; rank 0 converts a GGUF source first so that
every rank reads the same safetensors copy.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from specdec.models.hf import HFLanguageModel
from specdec.models.parallel.group import TensorParallelError, TPGroup, launched_by_torchrun
from specdec.models.parallel.target import ShardedTarget, follow

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FollowerFinished(SystemExit):
    """Raised on a rank ≥ 1 started by torchrun once rank 0 has stopped the group: the process has nothing
    left to do (uncaught, it exits with status 0)."""

    def __init__(self) -> None:
        super().__init__(0)


def check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"the tensor-parallel size must be a positive integer, got {size!r}")
    return size


def check_shardable(config: Any, size: int, name: str) -> None:
    """Refuse a model transformers cannot shard over `size` ranks: no plan, or heads that do not split evenly."""
    text = config.get_text_config(decoder=True)
    if not getattr(text, "base_model_tp_plan", None):
        raise ValueError(f"transformers has no tensor-parallel plan for {name} ({text.model_type}); "
                         "it cannot be sharded (run it with --tensor-parallel-size 1)")
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    if heads % size or kv_heads % size:
        fits = [n for n in range(1, kv_heads + 1) if heads % n == 0 and kv_heads % n == 0]
        raise ValueError(
            f"{name} has {heads} attention heads and {kv_heads} key/value heads, which do not split evenly over "
            f"{size} tensor-parallel ranks; sizes that divide both: {', '.join(map(str, fits))}"
        )


def check_device(device: str | torch.device, size: int) -> str:
    """The device type every rank uses; refuses what transformers' tensor-parallel loading cannot do."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index not in (None, 0):
            raise ValueError(f"with tensor parallelism rank r runs on cuda:<local rank r>, so --device {dev} cannot "
                             "be honoured; choose the GPUs with CUDA_VISIBLE_DEVICES instead")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", size)) if launched_by_torchrun() else size
        if torch.cuda.device_count() < local:
            raise ValueError(f"tensor parallelism over {local} ranks on this machine needs {local} GPUs; "
                             f"{torch.cuda.device_count()} are visible")
    elif dev.type == "cpu":
        if torch.cuda.is_available():
            raise ValueError("transformers places tensor-parallel shards on the machine's accelerator, so CPU ranks "
                             "are not possible while a GPU is visible; hide it with CUDA_VISIBLE_DEVICES= to shard "
                             "on the CPU, or use --device cuda")
    else:
        raise ValueError(f"tensor parallelism runs on cpu (gloo) or cuda (NCCL), not on {dev.type}")
    return dev.type


def cpu_threads(device_type: str, size: int) -> int:
    """Torch threads for each CPU rank (this one included): this process's count, lowered so that the ranks
    of one machine do not oversubscribe its cores (ranks spinning for the same cores made a tiny model's
    forward several times slower here). None of this applies on CUDA."""
    threads = torch.get_num_threads()
    if device_type != "cpu":
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", size)) if launched_by_torchrun() else size
    if threads * local > cores:
        threads = max(1, cores // local)
        log.info("tensor parallelism on the CPU: %d torch threads per rank (%d ranks, %d cores)", threads, local, cores)
        torch.set_num_threads(threads)
    return threads


def prepare(spec: str, size: int, progress: bool) -> None:
    """On rank 0, before any other rank loads: convert a GGUF once and check the model can be sharded."""
    from specdec.models.hub.load import load_config, prepare_model

    prepare_model(spec, progress=progress)
    check_shardable(load_config(spec), size, str(spec))


def load_shard(group: TPGroup, spec: str, dtype: torch.dtype) -> tuple[HFLanguageModel, "PreTrainedTokenizerBase"]:
    """Join the process group and load this rank's shard (all ranks at once: loading is collective)."""
    from specdec.models.hub import load_model

    group.init_process_group(local_rank=int(os.environ.get("LOCAL_RANK", group.rank)))
    model, tokenizer = load_model(spec, dtype=dtype, device=group.device_type, progress=False,
                                  tensor_parallel_size=group.world_size)
    return HFLanguageModel(model), tokenizer


def start_sharded_target(
    spec: str, size: int, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[ShardedTarget, "PreTrainedTokenizerBase"]:
    """Rank 0's sharded target and its tokenizer, with the other ranks running.

    Started from a plain process, this process becomes rank 0 and starts ranks 1 … size-1 on this machine.
    Started by torchrun, every rank calls it: rank 0 returns, the others serve rank 0 until it stops the
    group and then raise `FollowerFinished`.
    """
    size = check_size(size)
    device_type = check_device(device, size)
    dtype_name = next((k for k, v in DTYPE_NAMES.items() if v == dtype), None)
    if dtype_name is None:
        raise ValueError(f"tensor parallelism supports the dtypes {', '.join(DTYPE_NAMES)}, not {dtype}")
    if launched_by_torchrun():
        group = TPGroup.join_from_env(size, device_type)
        cpu_threads(device_type, size)
        if group.rank != 0:
            run_follower(group, str(spec), dtype)
            raise FollowerFinished()
        try:
            prepare(str(spec), size, progress)
        except Exception as exc:
            group.broadcast_text("ready", f"rank 0 refused the model: {exc}")
            raise
        group.broadcast_text("ready", "")
    else:
        prepare(str(spec), size, progress)
        group = TPGroup.launch(size, device_type, {
            "spec": str(spec), "dtype": dtype_name, "device": device_type, "threads": cpu_threads(device_type, size),
        })
    try:
        group.wait_for("hello")  # a worker that dies while starting fails this, never a blocked join
        lm, tokenizer = load_shard(group, str(spec), dtype)
        group.wait_for("loaded")
    except BaseException as exc:
        reason = group.rank_failure(wait_s=2.0) if isinstance(exc, Exception) else None
        group.fail(reason or f"rank 0 could not start the tensor-parallel target ({type(exc).__name__})")
        group.close()
        if reason and not isinstance(exc, TensorParallelError):
            raise TensorParallelError(reason) from exc
        raise
    return ShardedTarget(lm, group), tokenizer


def run_follower(group: TPGroup, spec: str, dtype: torch.dtype) -> None:
    """A rank ≥ 1 from start to stop: wait for rank 0, join, load the shard, replay rank 0's calls."""
    refusal = group.broadcast_text("ready")
    if refusal:
        raise TensorParallelError(refusal)
    group.announce("hello")
    try:
        lm, _ = load_shard(group, spec, dtype)
    except Exception as exc:
        group.announce("loaded", f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise
    group.announce("loaded")
    follow(lm, group)
    group.close()
