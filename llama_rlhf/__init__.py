"""Llama 2-Chat alignment (reward models, rejection sampling, PPO, Ghost Attention) in JAX."""
