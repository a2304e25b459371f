"""Semi-supervised segmentation: a few labeled images plus many unlabeled ones.

``train(SemiConfig)`` runs ``supervised_only``, ``fixmatch``, ``unimatch`` or ``self_training``
(:mod:`.train`); splits of a labeled dataset into labeled / unlabeled parts are in
:mod:`labelwise.data.splits`.
"""

from labelwise.methods.semi.config import METHODS, SemiConfig, SemiSettings
from labelwise.methods.semi.train import SemiResult, train

__all__ = ["METHODS", "SemiConfig", "SemiResult", "SemiSettings", "train"]
