"""confu_lightning: train and evaluate speculative-decoding drafts (EAGLE-3, ConFu) with Lightning.

The package root only carries the version; every heavy import lives inside the module that needs it.
"""

__version__ = "0.1.0"
