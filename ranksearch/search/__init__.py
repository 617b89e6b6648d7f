"""The search: the ask -> launch -> report -> tell loop over Optuna, with its samplers and
pruners, trial slots, worker launch and supervision, warm workers, storage and recovery.
"""
