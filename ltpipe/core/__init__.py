"""The layer every stage imports: params, errors, paths, the registry type, devices and seeds.

Nothing here imports the rest of ltpipe, so a change in a method never re-runs extraction.
"""
