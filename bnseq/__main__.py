"""`python -m bnseq`: the same as the `bnseq` command."""

import sys

from bnseq.cli import main

if __name__ == "__main__":
    sys.exit(main())
