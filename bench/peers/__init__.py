"""The servers a user would pick instead of this one (LitServe, NVIDIA Triton through PyTriton),
each serving the project's checkpoint with the project's own work; run from their own venv."""
