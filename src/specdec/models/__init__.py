"""Models: the `LanguageModel` contract, the transformers adapter with its slot cache, batched rows,
exact toy models and t(k) timing, and the weights paths a model can take: `dense/` (transformers
modules with full-precision weights), `native/` (GGUF blocks computed on by our integer kernels),
`parallel/` (a target sharded over tensor-parallel ranks) and `hub/` (fetching and loading)."""
