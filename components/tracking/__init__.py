"""What MLflow keeps: runs (idempotent records, resume) and the model registry (register, promote, roll back)."""
