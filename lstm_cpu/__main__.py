"""``python -m lstm_cpu``: the same as the ``lstm-cpu`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
