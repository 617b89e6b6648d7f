"""MLflow: one experiment and parent run per study, one nested run per trial, and the MLflow UI
opened on them. Only the orchestrator logs; workers never import MLflow.
"""
