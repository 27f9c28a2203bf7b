"""`python -m raftlm` and the `raftlm` command."""

import sys

from raftlm.run.threads import prefer_passive_wait


def main() -> int:
    """Run the CLI. The OpenMP wait policy is set first: libgomp reads it once, when torch is
    first imported (`raftlm.run.threads`)."""
    prefer_passive_wait()
    from raftlm.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
