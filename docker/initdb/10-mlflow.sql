-- The MLflow tracking server keeps its runs in a database of its own, beside Optuna's.
CREATE DATABASE mlflow;  -- run as POSTGRES_USER, who owns it
