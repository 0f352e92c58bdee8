"""Search: the planner (Pareto front of staged plans) and ``merge_layer: auto`` built on it."""
