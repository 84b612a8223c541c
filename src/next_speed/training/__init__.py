"""Steps 05 and 06: the shared training-loop pieces, the planner trainer and the decoder trainer."""
