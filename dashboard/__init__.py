"""The Streamlit dashboard's pieces: chart builders (pure Altair), cached data access and panels.

app.py wires them together; `charts` and `trajectories` import no Streamlit, so they are testable alone.
"""
