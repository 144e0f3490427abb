"""The Hugging Face integration shipped inside every output directory (``trust_remote_code``).

These files must stay importable on their own (only torch + transformers), because transformers copies
them out of the output directory and imports them without romcomp installed.
"""
