"""The `labbench` command line."""


def main(argv=None) -> int:
    raise SystemExit("labbench: not yet available")
