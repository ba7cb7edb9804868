"""The ``semlens`` command line: one module per command group, each a thin layer over the library.

Every module in this package that defines ``register(app: typer.Typer)`` is discovered and asked to
add its commands; no central list has to be edited to add a command group.
"""
