"""Packaged copy of app.py, used by `launch` when there is no checkout around the package."""

from workbench.ui.main import main

main()
