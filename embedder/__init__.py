"""gen2embed's ML library: plain functions over files.

Nothing in this package imports prefect or mlflow (see docs/design.md): every stage can be
called, tested and profiled as an ordinary function.
"""
