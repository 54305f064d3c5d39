"""Thin absl binaries; the only place that reads absl FLAGS."""
