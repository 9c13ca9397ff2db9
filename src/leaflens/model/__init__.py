"""The classifier: any timm model by name with pretrained weights (``factory``), its classifier on the pooled
features (``heads``: linear or cosine) and how much of it trains (``peft``).
"""

from leaflens.model.factory import create_model
from leaflens.model.heads import CLASSIFIERS, CosineClassifier
from leaflens.model.peft import STRATEGIES, apply_peft, merge_adapters, set_train_mode, trainable_table

__all__ = [
    "CLASSIFIERS",
    "STRATEGIES",
    "CosineClassifier",
    "apply_peft",
    "create_model",
    "merge_adapters",
    "set_train_mode",
    "trainable_table",
]
