"""One module per `protorkd` command; each exposes `add_parser(subparsers)`."""
