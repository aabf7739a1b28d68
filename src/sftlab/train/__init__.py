"""Training side: the loop, optimizer and schedule, checkpoints, metrics."""
