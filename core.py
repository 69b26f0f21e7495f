"""The phase-1 model, where a reader starts: what each part is and the module that holds it. Each module is one
concern; this file only re-exports their names, so code written against core.py imports what it always did
(the project's own modules import from where a name lives):

    registers.py   register tokens: the attention mask and blocks, RegisterTokenModule, the FSQ bottleneck,
                   NestedDropout, the preservation decoder, the k grid (doubling_grid)
    losses.py      the losses as plain functions of tensors (InfoNCE, Matryoshka, alignment, preservation,
                   complementary, decorrelation) and the flow head (FlowMatcher)
    designs.py     ModelConfig and what it picks by name: the design lines (DESIGNS: flextok, fluxtalk, adapter)
                   and the leakage guards (LEAKAGE_GUARDS)
    alignment.py   AlignmentModel (a design plus the losses across modalities, on frozen features) and Aligner
                   (frozen encoders in front of it: images and captions in, tokens and embeddings out)
    seed_api.py    the seed package's names: AlignmentConfig, VisionTextAligner, RegisterTokenLoss, set_seed,
                   get_device"""
from alignment import Aligner, AlignmentModel, batch_inputs
from designs import DESIGNS, FluxTalkDesign, LEAKAGE_GUARDS, ModelConfig
from features import Features
from losses import (FlowMatcher, alignment_loss, complementary_regularizer, decorrelation_penalty, gather_with_grad,
                    info_nce, matryoshka_info_nce, preservation_loss)
from registers import (DROPOUT_MODES, FeatureDecoder, NestedDropout, RegisterTokenModule, finite_scalar_quantize,
                       register_attention_mask)
from seed_api import AlignmentConfig, RegisterTokenLoss, VisionTextAligner, get_device, set_seed
