"""Multi-label image classification with captions: image branch, caption branch,
CNN-RNN label decoder and their fusion."""

__version__ = "0.1.0"
