"""Weight-only quantization: Int8Linear (int8), Int4Linear (int4), what they share (linear_base), weights that
arrive quantized (prequantized), and quantize_model() that swaps them into a model."""
