"""The `tunelite` command: ls, cp, run, validate, generate and estimate, one module per subcommand."""
