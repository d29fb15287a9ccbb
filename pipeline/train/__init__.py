"""Phase one: train a model and record its parameter trajectory into a store."""

from pipeline.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
