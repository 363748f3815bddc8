"""Views of a store: read tokens with `store`, compute with `analysis`, cache the results on disk.

This is the app's data layer (and the report command's): it is where store and analysis meet, so the
analysis package stays free of DuckDB and app.py stays thin.
"""
