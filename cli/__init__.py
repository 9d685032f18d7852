"""The `plan` command line."""
