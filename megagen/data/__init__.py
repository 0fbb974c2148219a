"""Data: synthetic samples now; bucketed latent shards and loaders build on the same batch contract."""

from megagen.data.synthetic import SyntheticDataset, sample_seed

__all__ = ["SyntheticDataset", "sample_seed"]
