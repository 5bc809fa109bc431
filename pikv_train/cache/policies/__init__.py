"""Cache scheduling policies (H2O, StreamingLLM, Quest, FlexGen, LRU, LRU+, AdaKV, DuoAttention)."""
