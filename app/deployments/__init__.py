"""Ray Serve glue: the only package (with builder.py and handles.py) that imports ray."""
