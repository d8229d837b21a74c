"""Models: the `LanguageModel` contract, the transformers adapter with its slot cache, the CPU fast
path, offloading, exact toy models, and the hub that fetches and loads weights."""
