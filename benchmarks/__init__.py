"""fusedlr benchmark suite: one full optimizer step (AMP unscale + global clip + scheduled LR + AdamW),
fusedlr's backends against torch's recipe. ``python benchmarks/run.py`` or ``pytest benchmarks --benchmark-only``."""
