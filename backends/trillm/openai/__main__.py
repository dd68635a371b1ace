import sys

from trillm.openai.server import main

sys.exit(main())
