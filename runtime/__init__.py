"""meshplan runtime: applies a compiled Program under torchrun."""
