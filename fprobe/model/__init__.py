"""The policy as a pure function of its parameters: the transformers model, fprobe's attention and softmax, token statistics and the passes over a batch."""
