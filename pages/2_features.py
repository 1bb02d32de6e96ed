"""Placeholder."""
import streamlit as st

from webapp import state

run = state.run_picker()
st.title("2_features")
