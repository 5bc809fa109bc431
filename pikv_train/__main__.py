"""``python -m pikv_train`` -> :func:`pikv_train.cli.main`."""

from pikv_train.cli import main

if __name__ == "__main__":
    main()
