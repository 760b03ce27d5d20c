"""The `inspectd` command line: the entry point (`cli.main`) and one module per command group."""
