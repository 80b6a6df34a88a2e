"""The training entry points the training scripts call. Nothing else in the package
imports these modules: inference depends only on the branches."""
