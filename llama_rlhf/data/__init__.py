"""Data layer: tokenizer, Llama 2 chat format, preference comparisons, HH-RLHF and batching.

Modules are imported one by one (`from llama_rlhf.data import chat`), so that reading data
never pulls in transformers or tensorflow-datasets unless needed.
"""
