import sys

from egress.cli import main

sys.exit(main())
