"""afs_build: turns an OLMo 2 checkpoint into a compiled, model-specialised inference engine.

Stages (each a function you can run alone): resolve -> config -> plan -> render -> compile -> pack.
"""

__version__ = "0.1.0"
