"""Core types every layer shares: token trees, the sampling operator, verification results,
typed method options, and the on-disk cache and profile store."""
