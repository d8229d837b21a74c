"""A tensor-parallel worker started by `TPGroup.launch`: `python -m specdec.models.parallel.worker`.

Its rank and the rendezvous come from torchrun's variables (set by the launching rank 0), what to
load from SPECDEC_TP_WORKER; it then runs `run_follower` like a torchrun-started rank.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main() -> int:
    # Ctrl-C reaches the whole terminal process group: rank 0 handles it and stops this rank cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from specdec.models.parallel.group import WORKER_ARGS_ENV, TPGroup
    from specdec.models.parallel.launch import DTYPE_NAMES, run_follower

    args = json.loads(os.environ[WORKER_ARGS_ENV])
    rank = os.environ.get("RANK", "?")
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    try:
        group = TPGroup.join_from_env(int(os.environ["WORLD_SIZE"]), args["device"])
        run_follower(group, args["spec"], DTYPE_NAMES[args["dtype"]])
    except torch.distributed.DistNetworkError:
        print(f"specdec: tensor-parallel rank {rank}: rank 0 went away (its store connection closed); exiting",
              file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        print(f"specdec: tensor-parallel rank {rank}: {type(exc).__name__}: {lines[0] if lines else ''}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
