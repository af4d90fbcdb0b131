import sys

from nextstep.cli import main

sys.exit(main())
