"""spiral: Sequential-Parallel-Aggregative RL for language models."""
__version__ = "0.1.0"
