"""pikv_train: distill LLM teachers into PiKV Mixture-of-Experts students with scheduled KV caches."""

__version__ = "0.1.0"
