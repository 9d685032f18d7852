"""The planner: model graph, passes, and the Program IR."""
