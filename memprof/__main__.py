"""``python -m memprof``: the same as the ``memprof`` command."""

from memprof.cli import main

if __name__ == "__main__":
    main(prog_name="memprof")
