"""From files to a model: find it (catalog), open and check the checkpoint (checkpoint, gguf_file,
safetensors_file, json_files, config_checks), and rewrite pickles as safetensors (convert)."""
