"""The answer of a study: the best and the recommended trial, the confirmation round, report
data, plots and the HTML report, the exported adapter and the MLflow model.
"""
