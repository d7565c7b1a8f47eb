"""``python -m myopia ARGS``: the ``myopia`` command line."""

import sys

from myopia.cli import main

if __name__ == "__main__":
    sys.exit(main())
