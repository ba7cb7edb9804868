"""Demo steps, discovered and run in name order by :func:`semlens.experiments.demo.run_demo`."""
