"""Training: runtime (strategy/XLA/precision), the custom loop, run artifacts."""
