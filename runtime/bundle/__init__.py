"""The bundle: its typed manifest (schema.py), the component descriptions (spec.py), and opening and checking one (opener.py, manifest.py)."""
