"""Every nn.Module of the branches: backbones, heads, the label decoder, the end-to-end image
model and the caption RNN. They know nothing about datasets or loaders."""
