"""Offloaded targets: weights in CPU RAM, streamed to the GPU one decoder layer per forward.

The setting SpecExec and Sequoia were built for: a pass over a thousand tokens costs about what a
pass over one costs, because the weights' transfer dominates (docs/algorithms.md §6, §7).
"""

from __future__ import annotations

import torch

from specdec.models.hf import HFLanguageModel


def check_offload_device(device: str | torch.device) -> None:
    """ValueError unless `device` is a GPU, what offloading streams the weights to (checked before loading)."""
    if torch.device(device).type != "cuda":
        raise ValueError(
            f"offloading keeps the target's weights in CPU RAM and streams them to a GPU layer by layer; this run is "
            f"on {device}, where there is nothing to offload to. For what offloading would give, run "
            "`specdec tune --project-offload --bandwidth GB/s --target-params N` (a projection from measured acceptance)"
        )


def offload_target(lm: HFLanguageModel, execution_device: str | torch.device, *, allow_cpu: bool = False) -> None:
    """Keep `lm`'s weights in CPU RAM and stream them to `execution_device` one decoder layer at a
    time during each forward (accelerate's CPU offload hooks). Idempotent.

    allow_cpu: accept a CPU execution device too, where the hooks run but gain nothing (tests use
    the CPU as a stand-in for the GPU).
    """
    from accelerate import cpu_offload

    device = torch.device(execution_device)
    if not allow_cpu:
        check_offload_device(device)
    if getattr(lm, "offloaded", False):
        return
    model = lm.model
    state = {name: t.detach().to("cpu") for name, t in model.state_dict().items()}
    if device.type == "cuda":  # page-locked memory: asynchronous host-to-device copies
        state = {name: t.pin_memory() for name, t in state.items()}
    layers = getattr(getattr(model, "model", None), "layers", None)
    # A whole decoder layer is fetched at once (one transfer per layer, not one per Linear).
    preload = [type(layers[0]).__name__] if layers is not None and len(layers) else None
    cpu_offload(model, execution_device=device, state_dict=state, preload_module_classes=preload)
    lm.device = device
    lm.offloaded = True
