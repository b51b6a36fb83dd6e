"""The device: a small protocol (base.py) and the simulated device that implements it."""
