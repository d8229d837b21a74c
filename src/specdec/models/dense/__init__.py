"""The dense weights path: full-precision copies of the weights in transformers modules.

What a dense model can be given at load, each measured per machine and cached: the linear path per
row-count bucket (`kernel_choice`, over the paths of `linear_paths`; `fastpath` keeps the old
switch and the int8 draft), row invariance in reduced precision (`invariance`), the draft's
precision (`draft_precision`), a pruned draft output head (`pruned_head`) and streaming the
weights to a GPU layer by layer (`offload`).
"""
