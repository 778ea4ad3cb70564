"""The RL step as a pure function: losses, functional optimizers, the step, and training checkpoints."""
