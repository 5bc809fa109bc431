"""The road from our students to the Hugging Face world (SPEC §8): export to a transformers architecture, our cache
policies inside ``generate()`` (:class:`PiKVCache`) and the ``"pikv"`` attention implementation (registered on import)."""

from pikv_train.hf.attention import train_under
from pikv_train.hf.cache import PiKVCache
from pikv_train.hf.export import hf_config, hf_state_dict, save_folder, to_hf

__all__ = ["PiKVCache", "hf_config", "hf_state_dict", "save_folder", "to_hf", "train_under"]
