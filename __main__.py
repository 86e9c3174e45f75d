import sys

from dopr.scripts.cli import main

sys.exit(main())
