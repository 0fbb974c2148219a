"""Training: objective, optimizer, loop."""

from megagen.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
