"""`cdc-pipeline demo`: one command from a fresh clone to a running, watched pipeline."""
