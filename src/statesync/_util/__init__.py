"""Small shared helpers (files, sorted arrays); private to statesync."""
