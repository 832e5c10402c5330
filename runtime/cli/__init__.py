"""``ldm-run`` (run.py), its one-line error reporting shared by every CLI (errors.py), and ``--server`` (served.py)."""
