"""Launchers: torchrun and Slurm wrappers and the Python that builds their command lines."""
