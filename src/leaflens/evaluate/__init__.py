"""Evaluation: metrics, calibration and the abstain rule, figures and the report (``evaluate(cfg)`` in
``run``)."""
