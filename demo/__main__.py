import sys

from demo.orchestrate import main

sys.exit(main())
