"""Benchmarks of runs_app against raw psycopg baselines measured in the same run.

Run ``python bench/run.py --help``. Nothing here is imported by the app or its tests.
"""
