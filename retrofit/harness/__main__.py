"""``python -m mc_retrofit.harness ...``: lm-eval's command line with the ``mc-retrofit`` model registered."""
from mc_retrofit.harness.run import main

if __name__ == "__main__":
    main()
