"""Models: typed configs, attention, MoE FFN, the decoder stack, generation."""

from pikv_train.models.config import PRESETS, ModelConfig, MoEConfig
from pikv_train.models.decoder import Decoder, DecoderOutput
from pikv_train.models.generation import Generation, generate, sample_next

__all__ = ["Decoder", "DecoderOutput", "Generation", "ModelConfig", "MoEConfig", "PRESETS", "generate", "sample_next"]
