"""Reinforcement learning: rollouts, advantages (set / aggregation / GRPO), loss, trainer."""
