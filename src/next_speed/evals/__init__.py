"""Evaluations: RVQ error, the planner against baselines, code agreement, whole-text quality, the report."""
