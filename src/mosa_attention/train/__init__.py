"""Training: configuration, the loop, optimizer and schedule, checkpoints, distributed wrappers (`mosa train`)."""
