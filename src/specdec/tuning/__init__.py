"""Hardware-aware tuning: forward-pass timings t(k), the draft's positional acceptance vectors, the
choice of the fastest Sequoia tree (or none) for this machine, and the offloading projection."""
