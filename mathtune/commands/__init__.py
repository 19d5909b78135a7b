"""One module per ``mathtune`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``."""
