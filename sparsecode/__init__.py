"""sparsecode: sparse coding and dictionary learning on one batched torch solver core.

The scikit-learn layer (:func:`sparse_encode`, :class:`SparseCoder`) sits on
:mod:`sparsecode.core` (operators, solvers, sparse codes), which the SAEs and the pruner share.
"""

from .coder import SparseCoder
from .decomposition import ALGORITHMS, sparse_encode
from .dict_learning import DictionaryLearning, MiniBatchDictionaryLearning
from .ksvd import KSVD
from .lista import LISTA

__all__ = [
    "ALGORITHMS",
    "KSVD",
    "LISTA",
    "DictionaryLearning",
    "MiniBatchDictionaryLearning",
    "SparseCoder",
    "sparse_encode",
]
__version__ = "0.1.0"
