"""Security: credentials kept out of a run's records, and who may do what on a team's MLflow server."""
