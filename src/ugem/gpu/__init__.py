"""The GPU: a small protocol (base.py, `GpuBackend`), the simulated GPU that implements it
(sim.py) and the semantics of its commands (commands.py)."""
