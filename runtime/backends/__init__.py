"""The backends: one interface (base.py), one module per engine kind, and how one is picked and opened (choose.py)."""
