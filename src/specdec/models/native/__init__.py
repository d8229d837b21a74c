"""GGUF low-bit weights computed on directly (``--weights native``).

A GGUF file stores each weight matrix row by row as blocks of 32 or 256 values: small integers plus
per-block scales (and mins). Here the blocks stay as they are in the file and every linear layer
multiplies their dequantized values (scale × quant − min, exactly as the `gguf` package
dequantizes them, in float32) with float32 activations, accumulating in float32.

One concept per module: `formats` (the block layouts and a pure-torch decoder, bitwise equal to
`gguf.quants.dequantize`), `kernels` (the compiled CPU kernels: built on first use for this CPU's
instruction set, cached, loaded as torch ops; and PyTorch's own int4 kernel where it represents a
format exactly), `linear` (`GGUFLinear`/`GGUFEmbedding`, drop-in modules for `nn.Linear` and
`nn.Embedding`) and `load` (a transformers model built around a GGUF file's blocks).
"""
