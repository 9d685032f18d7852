"""The plan language: grammar, AST, diagnostics, model-free checks, formatting.

Nothing here imports torch.
"""
