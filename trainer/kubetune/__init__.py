"""kubetune: fine-tune pre-trained models from one FineTuneJob manifest.

Kept import-light on purpose: the operator image imports the spec without torch.
"""

__version__ = "0.1.0"
