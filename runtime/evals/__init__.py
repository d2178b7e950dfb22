"""Benchmarks that score generated code by running it: HumanEval (``pinfer eval humaneval``)."""
