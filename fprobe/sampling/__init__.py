"""Batches from the policy: prompts, generation, rewards and advantages, and the built-in toy task."""
