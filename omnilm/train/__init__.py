"""Training: the loop, what each stage builds, optimizer and schedule, checkpoints, the recipe."""
