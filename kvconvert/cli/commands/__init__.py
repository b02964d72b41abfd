"""One module per subcommand; discovered by `kvconvert.cli.main`."""
