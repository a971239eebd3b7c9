"""Sparse autoencoders: architectures, trainer, metrics and formats.

Public API::

    from analyses.sae import train_sae, load_sae, evaluate_sae, export_sae
    sae = train_sae(acts, arch="topk", d_sae=4608, k=32)        # tensor [n, d] or callable epoch -> batches
    sae.encode(x); sae.decode(f); sae(x); sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, sae.cfg
    sae.save("saes/my_sae")                                    # SAELens 6.x folder
    sae = load_sae("saes/my_sae")                              # or SAE.load(path); also sparsify folders
    metrics = evaluate_sae(sae, acts)                          # L0, FVU, explained variance, density, ...
    export_sae(sae, "sparsify", "out/")                        # saelens | sparsify | neuronpedia

Architectures (``ARCHS``, filled by :func:`register_arch` in each architecture module — see registry.py):
relu (L1), topk (+AuxK), batchtopk, jumprelu, matryoshka (BatchTopK), mutual_choice / feature_choice
(+ aux_zipf_loss), topafa (no fixed k), mp (matching pursuit), gba (group bias adaptation).
"""

from .base import (KNOWN_ARCHS, SAE, SAEConfig, SparseActs, TrainStepInput, TrainStepOutput, check_d_in,
                   sparse_decode)
from .registry import ARCHS, arch_names, get_arch, register_arch, unregister_arch, uses_k
# importing an architecture module registers it; this order is the order of ARCHS (and of the CLI choices)
from .relu import ReLUSAE
from .topk import TopKSAE
from .batchtopk import BatchTopKSAE
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .feature_choice import FeatureChoiceSAE, MutualChoiceSAE
from .topafa import TopAFASAE
from .mp import MatchingPursuitSAE
from .gba import GroupBiasAdaptationSAE

from .formats import (FORMATS, export_sae, load_saelens, load_sae, load_sparsify, save_saelens,  # noqa: E402
                      save_sparsify)
from .metrics import SAEMetrics, density_histogram, evaluate_sae  # noqa: E402
from .train import SAETrainingError, default_lr, geometric_median, make_sae, train_sae  # noqa: E402

__all__ = [
    "ARCHS", "KNOWN_ARCHS", "FORMATS", "SAE", "SAEConfig", "SparseActs", "TrainStepInput", "TrainStepOutput",
    "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "MatryoshkaSAE",
    "MutualChoiceSAE", "FeatureChoiceSAE", "TopAFASAE",
    "MatchingPursuitSAE", "GroupBiasAdaptationSAE",
    "register_arch", "unregister_arch", "arch_names", "get_arch", "uses_k",
    "train_sae", "make_sae", "default_lr", "geometric_median", "SAETrainingError",
    "evaluate_sae", "SAEMetrics", "density_histogram",
    "save_saelens", "load_saelens", "load_sae", "load_sparsify", "save_sparsify", "export_sae",
    "check_d_in", "sparse_decode",
]
