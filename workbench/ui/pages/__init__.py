"""The UI pages: one module per page, each with render(); Streamlit runs them as page scripts."""
