"""The continuous-batching engine's defaults, apart from `engine.batch` so that the command line
can show them without importing torch."""

DEFAULT_MAX_BATCH_SIZE = 8
"""Sequences decoded together."""
DEFAULT_PREFILL_CHUNK = 512
"""Prompt tokens filled per engine step."""
DEFAULT_SPEC_DISABLE_BATCH_SIZE = 8
"""Steps draft nothing with more sequences running than this, unless told otherwise. A default, not
a measurement: where speculation stops paying depends on the hardware, the models and the method
(`specdec bench-serve` measures it; a tune profile may carry it as `PROFILE_FIELD`). Equal to the
default batch size, so that by default speculation is never turned off."""
PROFILE_FIELD = "speculative_disable_by_batch_size"
"""The optional tune-profile field (an int) that `specdec serve` reads as its threshold."""
