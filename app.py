"""Streamlit entry point: `streamlit run app.py -- --workspace DIR` (or `workbench app`)."""

from workbench.ui.main import main

main()
