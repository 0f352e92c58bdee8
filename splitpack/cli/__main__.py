import sys

from splitpack.cli import main

sys.exit(main())
