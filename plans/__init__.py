"""Shipped plans and model presets (data files)."""
