"""Model presets: published config.json values of real models, and tiny test models."""
