"""A target sharded over a tensor-parallel group, behind the `LanguageModel` contract on rank 0.

Every rank holds an `HFLanguageModel` over its shard of the weights (transformers' tensor-parallel
plan: attention heads and MLP columns split, each rank's slot cache holding its own KV heads) and
the same cache bookkeeping: the masks, depth positions and commit-by-index of models/hf.py are pure
functions of the calls, so replaying the same calls keeps every rank's cache in the same state.

`ShardedTarget` (rank 0) applies each call to its own shard and sends it to the others, which
replay it in `follow`. Only a forward needs the others at that moment (the model's all-reduces
pair up across ranks, one forward per step on every rank, in lockstep); `reset`, `commit` and
`crop` are local bookkeeping, so they travel with the next forward in one message. The lm_head's
plan gathers the logits, so rank 0 gets the full [n, V] logits and the decoding loop (drafting,
verification, sampling) runs once, there, exactly as in one process.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor

from specdec.models.hf import HFLanguageModel
from specdec.models.parallel.group import TensorParallelError, TPGroup


class ShardedTarget:
    """Rank 0's view of a tensor-parallel target: a `LanguageModel` whose calls every rank replays."""

    def __init__(self, lm: HFLanguageModel, group: TPGroup) -> None:
        if group.rank != 0:
            raise ValueError("only rank 0 drives a sharded target; the other ranks run `follow`")
        self.lm = lm
        self.group = group
        self.vocab_size: int = lm.vocab_size
        self.context_length: int = lm.context_length
        self.num_layers: int = lm.num_layers
        self.device = lm.device
        self.dtype = lm.dtype
        self.tensor_parallel_size: int = group.world_size
        self._pending: list[list[Any]] = []  # local calls not yet sent (they go with the next forward)
        # Dropping the target stops the other ranks (a pipeline whose construction failed later, say).
        self._finalizer = weakref.finalize(self, group.close)

    @property
    def model(self) -> Any:
        """Rank 0's shard of the transformers model (its config and parameter count are the whole model's)."""
        return self.lm.model

    @property
    def kv_len(self) -> int:
        return self.lm.kv_len

    def reset(self, max_len: int) -> None:
        self.group.check()
        self.lm.reset(max_len)  # a refused call (too long) raises here and is never sent
        self._pending.append(["reset", int(max_len)])

    def forward(
        self,
        input_ids: Tensor,  # [n] int64
        parents: Tensor | None = None,  # [n] int64 parents within the pending region (-1 = prefix); None = chain
        last_only: bool = False,
        append: bool = False,
    ) -> Tensor:  # [n, V] logits (or [1, V] when last_only), the same on every rank
        ops = self._pending + [["forward", input_ids.tolist(), None if parents is None else parents.tolist(),
                                bool(last_only), bool(append)]]
        with self.group.calls:
            self.group.publish(ops)
            self._pending = []
            try:
                logits = self.lm.forward(input_ids, parents, last_only=last_only, append=append)
            except ValueError:
                raise  # refused before any collective: every rank refuses the same call and goes on
            except Exception as exc:
                raise self.group.failure_error(exc) from exc
            except BaseException:  # Ctrl-C between sending the call and running it: the ranks are out of step
                self.group.fail("a target forward was interrupted on rank 0; the tensor-parallel ranks are out of step")
                raise
        return logits

    def commit(self, keep: Tensor | int) -> None:
        self.group.check()
        self.lm.commit(keep)
        self._pending.append(["commit", keep if isinstance(keep, int) else keep.tolist()])

    def crop(self, length: int) -> None:
        self.group.check()
        self.lm.crop(length)
        self._pending.append(["crop", int(length)])

    def cached_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """Rank 0's shard of one layer's committed K/V ([1, H / size, kv_len, D] each)."""
        return self.lm.cached_kv(layer)

    def close(self) -> None:
        """Stop the other ranks and leave the process group (also done when the target is dropped, and at exit)."""
        self._finalizer()


def follow(lm: HFLanguageModel, group: TPGroup) -> None:
    """On ranks ≥ 1: replay rank 0's calls on this shard until rank 0 says stop.

    A call refused with ValueError was refused identically on rank 0 (same state, same arguments),
    which reports it; any other error is posted for rank 0 and ends this rank.
    """
    import torch

    try:
        while True:
            seq, ops = group.receive()
            for op in ops:
                name, args = op[0], op[1:]
                if name == "stop":
                    return
                try:
                    if name == "forward":
                        ids, parents, last_only, append = args
                        lm.forward(torch.tensor(ids, dtype=torch.long),
                                   None if parents is None else torch.tensor(parents, dtype=torch.long),
                                   last_only=last_only, append=append)
                    elif name == "commit":
                        keep = args[0]
                        lm.commit(keep if isinstance(keep, int) else torch.tensor(keep, dtype=torch.long))
                    elif name == "reset":
                        lm.reset(args[0])
                    elif name == "crop":
                        lm.crop(args[0])
                    else:
                        raise TensorParallelError(f"unknown call {name!r} from rank 0 (mismatched specdec versions?)")
                except ValueError:
                    pass
            group.done(seq)
    except BaseException as exc:
        try:
            group.announce("error", f"{type(exc).__name__}: {exc}".splitlines()[0])
        except Exception:  # rank 0's store is gone too
            pass
        raise
