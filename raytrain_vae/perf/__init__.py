"""Measured speed-ups, one module each, each with a fallback when the internals it uses change.

The measurements behind them are in docs/performance.md."""
