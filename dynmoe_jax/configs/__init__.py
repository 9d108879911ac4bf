"""ml_collections configs: default.py (2-core CPU run), tiny.py (tests), paper.py (TPU/GPU),
pretrained.py (fine-tuning an imported checkpoint)."""
