"""Streamlit glue for the app (explorer/ never imports streamlit). See webapp/state.py."""
