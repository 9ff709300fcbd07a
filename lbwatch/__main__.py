import sys

from lbwatch.cli import main

sys.exit(main())
