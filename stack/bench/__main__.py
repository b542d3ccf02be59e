import sys

from stack.bench.run import main

sys.exit(main())
