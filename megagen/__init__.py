"""megagen: train Movie-Gen-class media foundation models with 3D parallelism."""

__version__ = "0.1.0"
