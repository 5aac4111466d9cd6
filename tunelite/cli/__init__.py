"""The `tunelite` command: ls, cp, run and validate, one module per subcommand."""
