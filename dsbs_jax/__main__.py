"""`python -m dsbs_jax ...` is `dsbs-train ...`."""

from dsbs_jax import cli

cli.console_main()
