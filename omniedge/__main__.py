import sys

from omniedge.cli import main

sys.exit(main())
