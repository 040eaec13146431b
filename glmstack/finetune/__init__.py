"""Fine-tuning (LoRA, P-Tuning v2) on the engine's own models. Run as `python -m glmstack.finetune` (or
`glmstack finetune`), a process of its own, so a training crash fails a job, not the server; nothing in
glmstack.api, store or jobs imports this package."""
