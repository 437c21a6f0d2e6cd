import sys

from gptjax.cli import main

if __name__ == "__main__":  # not when a worker process (prepare's encoders) imports it as its parent's main module
    sys.exit(main())
