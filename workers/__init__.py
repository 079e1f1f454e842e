"""Ray prefill and decode workers around a real causal LM."""
