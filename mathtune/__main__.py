"""``python -m mathtune``: what launchers run (``torchrun -m mathtune train ...``,
``accelerate launch -m mathtune eval ...``), the same as the ``mathtune`` command."""

import sys

from mathtune import distributed
from mathtune.cli import main

if __name__ == "__main__":
    try:
        code = main()
    finally:
        distributed.shutdown()
    sys.exit(code)
