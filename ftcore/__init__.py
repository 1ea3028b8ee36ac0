"""ftcore: instruction fine-tuning in raw PyTorch."""
