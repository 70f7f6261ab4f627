"""Weights in and out of other frameworks' layouts: Hugging Face GPT-2 (hf_gpt2)."""
