"""The QA evaluation harness behind ``microlora eval``: compile a corpus of passages into a
fresh store, ask every question with each system (closed book, RAG, parametric, hybrid,
oracle) and score the answers."""

from microlora.evaluation.harness import EvalConfig, run_eval

__all__ = ["EvalConfig", "run_eval"]
