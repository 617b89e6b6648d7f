"""The study file: its schema, paths and search space, loaded once into one `StudyConfig` or one
`StudyError` that lists every problem.

`ranksearch.config.StudyConfig`, `parse_study` and `load_study` are the public import paths.
"""

from ranksearch.config.load import load_study, parse_study
from ranksearch.config.problems import Problem, StudyError
from ranksearch.config.schema import StudyConfig

__all__ = ["Problem", "StudyConfig", "StudyError", "load_study", "parse_study"]
