"""Multi-label image classification with captions: image branch, caption branch,
CNN-RNN label decoder and their fusion."""

__version__ = "0.1.0"

__all__ = ["Predictor"]


def __getattr__(name: str):
    # Imported on first use: ``import pipeline.data`` runs this file, and must not load the
    # models, fusion and inference code the Predictor needs.
    if name == "Predictor":
        from pipeline.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
