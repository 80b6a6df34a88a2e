"""The training loop every branch shares, and what it runs on: one epoch, the best-epoch
loop with early stopping and resume, torchrun, devices and precision."""
