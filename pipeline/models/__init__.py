"""Neural network modules of the branches; they know nothing about files or loaders."""
