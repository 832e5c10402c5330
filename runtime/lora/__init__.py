"""LoRA without re-export: the files users have (files.py), merged in numpy and handed to the backends when sessions open (apply.py)."""
