"""triplets: mine anchor/positive/negative candidates and judge them (an LLM, an offline model, or none)."""
