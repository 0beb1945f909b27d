"""Reproducible, experiment-tracked MNIST CNN: DVC stages, Keras Tuner search, MLflow tracking."""

import os

# TensorFlow's C++ INFO/WARNING lines (oneDNN, CUDA probing) bury the pipeline's own progress
# output; errors still show. Must be set before TensorFlow is first imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
