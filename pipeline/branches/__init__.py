"""What each branch is: its settings, how its model is built and learns, its checkpoints,
and how inference rebuilds it and predicts. Used by training and inference alike."""
