-- The databases behind the stack: MLflow's tracking store, and Prefect's.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
