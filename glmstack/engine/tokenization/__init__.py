"""Tokenizers behind one interface (base.Tokenizer): HF tokenizer.json (hf), the vocabulary inside a GGUF
(gguf_vocab), and GLM's own sentencepiece/tiktoken tokenizers (glm)."""
