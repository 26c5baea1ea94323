"""Launchers for vgg_jax.main: local processes, Cloud TPU VM pods, SLURM, and Table 3 sweeps."""
