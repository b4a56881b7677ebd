"""Rollout engines per role (hf live or replica, vLLM) and the weight push into them."""
